//! The APIBAN client against the local APIBAN-compatible server: every documented response
//! shape, both API versions, and every fault a server can throw at it.

use std::time::Duration;

use apiban::source::apiban::{
    ApiKey, ApiVersion, ApibanClient, Batch, CheckOutcome, ClientConfig, ClientError, DataSet,
};
use tests::fake_apiban::{FakeApiban, Fault, NoNewBans};

const KEY: &str = "k3y0fTh3Test";

fn client(server: &FakeApiban, version: ApiVersion) -> ApibanClient {
    let mut config = ClientConfig::new(&server.base_url(), ApiKey::new(KEY).unwrap());
    config.version = version;
    config.timeout = Duration::from_millis(800);
    config.connect_timeout = Duration::from_millis(500);
    config.max_body = 256 * 1024;
    ApibanClient::new(config).unwrap()
}

async fn pull_all(client: &ApibanClient) -> (Vec<String>, String, usize) {
    let mut id = "100".to_string();
    let mut all = Vec::new();
    let mut batches = 0;
    loop {
        match client.fetch(&id).await.unwrap() {
            Batch::Addresses { addresses, next_id } => {
                all.extend(addresses);
                id = next_id;
                batches += 1;
            }
            Batch::Done => return (all, id, batches),
        }
    }
}

#[tokio::test]
async fn v2_pages_through_batches_then_polls_incrementally() {
    let server = FakeApiban::start(KEY);
    let published: Vec<String> = (1..=7).map(|i| format!("45.0.0.{i}")).collect();
    server.publish(&published);
    server.set_batch_size(3);
    let mut config = ClientConfig::new(&server.base_url(), ApiKey::new(KEY).unwrap());
    config.set = DataSet::All;
    let c = ApibanClient::new(config).unwrap();

    let (all, last_id, batches) = pull_all(&c).await;
    assert_eq!(all, published);
    assert_eq!(batches, 3);
    // Nothing new: both documented spellings of "no new bans" end the pull.
    assert_eq!(c.fetch(&last_id).await.unwrap(), Batch::Done);
    server.set_no_new_bans(NoNewBans::String);
    assert_eq!(c.fetch(&last_id).await.unwrap(), Batch::Done);
    // One new address: the stored ID returns only it.
    server.publish(&["45.0.0.99"]);
    let Batch::Addresses { addresses, .. } = c.fetch(&last_id).await.unwrap() else {
        panic!("the new address must come back");
    };
    assert_eq!(addresses, vec!["45.0.0.99"]);

    let log = server.requests();
    assert!(
        log.iter()
            .all(|r| r.method == "POST" && r.path == "/api/get")
    );
    assert!(log.iter().all(|r| r.set.as_deref() == Some("all")));
    assert_eq!(log[0].id.as_deref(), Some("100"));
}

#[tokio::test]
async fn v1_uses_the_key_in_the_path_and_never_shows_it() {
    let server = FakeApiban::start(KEY);
    server.publish(&["46.0.0.1", "46.0.0.2"]);
    let c = client(&server, ApiVersion::V1);
    let (all, _, _) = pull_all(&c).await;
    assert_eq!(all, vec!["46.0.0.1", "46.0.0.2"]);
    assert!(
        server
            .requests()
            .iter()
            .all(|r| r.path.starts_with("/api/<key>/banned/"))
    );

    // Errors from the transport layer name no URL and no key.
    let mut config = ClientConfig::new("http://127.0.0.1:1/api/", ApiKey::new(KEY).unwrap());
    config.version = ApiVersion::V1;
    let unreachable = ApibanClient::new(config).unwrap();
    let err = unreachable.fetch("100").await.unwrap_err();
    assert!(matches!(err, ClientError::Transport(_)), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains(KEY), "{text}");
}

#[tokio::test]
async fn wrong_key_rate_limits_and_server_errors() {
    let server = FakeApiban::start(KEY);
    server.publish(&["47.0.0.1"]);
    let mut config = ClientConfig::new(&server.base_url(), ApiKey::new("wrongkey").unwrap());
    config.timeout = Duration::from_secs(2);
    let wrong = ApibanClient::new(config).unwrap();
    assert_eq!(wrong.fetch("100").await, Err(ClientError::KeyRejected));
    let err = ClientError::KeyRejected.to_string();
    assert!(err.contains("API key rejected"), "{err}");

    let c = client(&server, ApiVersion::V2);
    for (fault, expected) in [
        (Fault::RateLimited, ClientError::RateLimited),
        (Fault::RateLimited400, ClientError::RateLimited),
        (Fault::Forbidden, ClientError::KeyRejected),
        (Fault::ServerError, ClientError::Server(500)),
        (Fault::Hang, ClientError::Timeout),
        (Fault::Huge, ClientError::BodyTooLarge(256 * 1024)),
    ] {
        server.fail_next(fault, 1);
        assert_eq!(c.fetch("100").await, Err(expected), "{fault:?}");
    }
    for fault in [Fault::NonJson, Fault::WrongShape] {
        server.fail_next(fault, 1);
        let err = c.fetch("100").await.unwrap_err();
        assert!(matches!(err, ClientError::BadBody(_)), "{fault:?}: {err:?}");
    }
    server.fail_next(Fault::Truncated, 1);
    let err = c.fetch("100").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Transport(_) | ClientError::BadBody(_)),
        "truncated body: {err:?}"
    );
    // Each fault cost one request; the client is fine afterwards.
    assert!(matches!(c.fetch("100").await, Ok(Batch::Addresses { .. })));
}

#[tokio::test]
async fn check_endpoint_in_both_versions() {
    let server = FakeApiban::start(KEY);
    server.publish(&["48.0.0.1"]);
    for version in [ApiVersion::V2, ApiVersion::V1] {
        let c = client(&server, version);
        assert_eq!(
            c.check("48.0.0.1".parse().unwrap()).await,
            Ok(CheckOutcome::Banned)
        );
        assert_eq!(
            c.check("48.0.0.2".parse().unwrap()).await,
            Ok(CheckOutcome::NotBanned)
        );
    }
}

/// APIBAN's answers carry a `Date`: the client measures this host's clock against it, which
/// `status` and /metrics show (`apiban_api_clock_offset_seconds`).
#[tokio::test]
async fn the_client_measures_this_hosts_clock_against_apibans_date() {
    let server = FakeApiban::start(KEY);
    let c = client(&server, ApiVersion::V2);
    assert_eq!(c.server_clock_offset_ms(), None, "no answer yet");
    server.set_clock_skew(3600);
    let _ = c.fetch("100").await;
    server.set_clock_skew(0);
    let offset = c.server_clock_offset_ms().expect("the answer had a Date");
    assert!(
        (3_598_000..=3_602_000).contains(&offset),
        "this host is an hour ahead of APIBAN's Date: {offset} ms"
    );
}
