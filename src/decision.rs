//! The routing decision for one OAuth request: where it goes and why.

/// Which upstream serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    Iam,
    Rails,
}

impl Destination {
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
    /// The path is not an OAuth endpoint.
    NotOauth,
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
    /// `routing.mode` is `rails` or `iam`.
    KillSwitch,
    /// The client id is in `routing.force_iam`.
    ForceIam,
    /// The client id is in `routing.force_rails`.
    ForceRails,
    /// `routing.percentage_of_actors` includes the client.
    Percentage,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotOauth => "not_oauth",
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
