//! Where a request goes and why: the routing decision, its reason, and why a request bound
//! for IAM ended at Rails. Their `as_str` labels are the metrics' and the logs' label
//! values; `ALL` lists every value in declaration order.

pub mod cache;
pub mod connect;
pub mod fleet;
pub mod preauth;
pub mod rules;

/// Which upstream serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    Iam,
    Rails,
}

impl Destination {
    pub const ALL: [Destination; 2] = [Destination::Iam, Destination::Rails];

    pub fn as_str(self) -> &'static str {
        match self {
            Destination::Iam => "iam",
            Destination::Rails => "rails",
        }
    }
}

/// Why a request was routed where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No `[iam]` table is configured.
    IamDisabled,
    /// A verifier or an IAM-issued code or token: the flow started at IAM and must finish
    /// there.
    Continuity,
    /// A code or token without an IAM prefix: Rails issued it and only Rails can redeem,
    /// refresh, revoke or introspect it.
    RailsIssued,
    /// No single valid client id; Rails owns `invalid_client` errors.
    UnknownClient,
    /// A cached pre-authorize answer (or one fetched by a concurrent request).
    Cache,
    /// This request asked the pre-authorize backend.
    Preauthorize,
    /// The pre-authorize backend failed and the client's last answer, expired no longer ago
    /// than its stale window, was served.
    Stale,
    /// The pre-authorize backend failed and there was no answer to fall back on; fail open
    /// to Rails.
    PreauthorizeError,
    /// `routing.mode` is `rails_only`, `rails` or `iam`.
    KillSwitch,
    /// The client id is in `routing.force_iam`.
    ForceIam,
    /// The client id is in `routing.force_rails`.
    ForceRails,
    /// `routing.percentage_of_actors` includes the client.
    Percentage,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::IamDisabled,
        Reason::Continuity,
        Reason::RailsIssued,
        Reason::UnknownClient,
        Reason::Cache,
        Reason::Preauthorize,
        Reason::Stale,
        Reason::PreauthorizeError,
        Reason::KillSwitch,
        Reason::ForceIam,
        Reason::ForceRails,
        Reason::Percentage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::IamDisabled => "iam_disabled",
            Reason::Continuity => "continuity",
            Reason::RailsIssued => "rails_issued",
            Reason::UnknownClient => "unknown_client",
            Reason::Cache => "cache",
            Reason::Preauthorize => "preauthorize",
            Reason::Stale => "stale",
            Reason::PreauthorizeError => "preauthorize_error",
            Reason::KillSwitch => "kill_switch",
            Reason::ForceIam => "force_iam",
            Reason::ForceRails => "force_rails",
            Reason::Percentage => "percentage",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub destination: Destination,
    pub reason: Reason,
}

impl Decision {
    pub const fn rails(reason: Reason) -> Decision {
        Decision {
            destination: Destination::Rails,
            reason,
        }
    }
}

/// Why an IAM-bound request was served by Rails instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    /// IAM refused, reset or closed the connection before sending response headers.
    ConnectError,
    /// IAM sent no response headers within `iam.timeout`.
    Timeout,
    /// IAM answered one of `iam.fallback_statuses`.
    Status,
    /// The breaker is open: IAM was not tried.
    BreakerOpen,
    /// Every one of `iam.max_connections` stayed busy for `iam.connect_timeout`: IAM was
    /// not tried, and the breaker does not count it.
    Saturated,
}

impl FallbackReason {
    pub const ALL: [FallbackReason; 5] = [
        FallbackReason::ConnectError,
        FallbackReason::Timeout,
        FallbackReason::Status,
        FallbackReason::BreakerOpen,
        FallbackReason::Saturated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::ConnectError => "connect_error",
            FallbackReason::Timeout => "timeout",
            FallbackReason::Status => "status",
            FallbackReason::BreakerOpen => "breaker_open",
            FallbackReason::Saturated => "saturated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metrics index their tables by `value as usize`.
    #[test]
    fn all_lists_every_value_in_declaration_order() {
        for (i, destination) in Destination::ALL.into_iter().enumerate() {
            assert_eq!(destination as usize, i);
        }
        for (i, reason) in Reason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "{reason:?}");
        }
        for (i, reason) in FallbackReason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "{reason:?}");
        }
    }
}
