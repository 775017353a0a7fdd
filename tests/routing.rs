//! Routing: each OAuth endpoint by the pre-authorize answer, for each identification source.

mod support;

use support::{gateway, Reply, TestClient};

#[tokio::test]
async fn token_request_for_an_iam_client_goes_to_iam() {
    let gw = gateway().start().await;
    gw.preauth.always(Reply::destination("iam"));
    let answer = TestClient::new()
        .post_form(
            &gw.url("/oauth/token"),
            "grant_type=client_credentials&client_id=app",
        )
        .await;
    assert_eq!(answer.served_by(), "iam");
    assert_eq!(gw.upstream_counts(), (0, 1, 1));
    gw.stop().await;
}
