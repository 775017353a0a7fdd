//! The shared cache's wire format: values and the lookup script's replies.

use super::*;

#[test]
fn values_round_trip_with_the_lifetime_redis_has_left() {
    let answer = Answer {
        destination: Destination::Iam,
        lifetime: Duration::from_secs(60),
        stale_if_error: Duration::from_secs(300),
    };
    assert_eq!(encode(&answer), "iam 300000");
    let left = Duration::from_millis(1234);
    assert_eq!(
        decode(&encode(&answer), left),
        Some(Answer {
            lifetime: left,
            ..answer
        })
    );
    for bad in ["", "iam", "elsewhere 5", "rails x"] {
        assert_eq!(decode(bad, left), None, "{bad:?}");
    }
}

#[test]
fn script_replies_are_read_strictly() {
    let reply = |parts: &[&str]| parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        parse_found(&reply(&["hit", "3", "rails 0", "1500"])),
        Some(Found::Hit(Answer {
            destination: Destination::Rails,
            lifetime: Duration::from_millis(1500),
            stale_if_error: Duration::ZERO,
        }))
    );
    assert_eq!(
        parse_found(&reply(&["hit", "0", "iam 0", "-1"])).map(|found| match found {
            Found::Hit(answer) => answer.lifetime,
            _ => Duration::ZERO,
        }),
        Some(Duration::MAX),
        "no expiry: capped by the reader"
    );
    assert_eq!(
        parse_found(&reply(&["won", "7"])),
        Some(Found::Won {
            generation: "7".into()
        })
    );
    assert_eq!(
        parse_found(&reply(&["wait", "7", "ab.1"])),
        Some(Found::Wait {
            holder: "ab.1".into()
        })
    );
    assert_eq!(
        parse_found(&reply(&["done", "7", "e"])),
        Some(Found::Done(None))
    );
    assert_eq!(
        parse_found(&reply(&["done", "7", "a iam 5000"])),
        Some(Found::Done(Some(Answer {
            destination: Destination::Iam,
            lifetime: Duration::ZERO,
            stale_if_error: Duration::from_secs(5),
        })))
    );
    for bad in [&["hit", "0", "iam 0"][..], &["won"], &["other", "1"], &[]] {
        assert_eq!(parse_found(&reply(bad)), None, "{bad:?}");
    }
}
