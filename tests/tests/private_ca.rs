//! APIBAN, or a mirror or TLS-inspecting proxy in front of it, behind a private CA: trusted
//! through `--api-ca`, or through the system's trust store, and refused otherwise with an
//! error that says why.

use tests::{
    agent::apiban_env,
    fake_apiban::{FakeApiban, PrivateCa},
    sync_harness::TempDir,
};

const KEY: &str = "caTestKey";

fn check_remote(config: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = apiban_env(&["check", "45.78.0.1", "--remote", "--config", config], env);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_mirror_behind_a_private_ca_is_trusted_through_api_ca_or_the_system_roots() {
    let ca = PrivateCa::new();
    let server = FakeApiban::start_tls(KEY, &ca);
    server.publish(&["45.78.0.1"]);
    let dir = TempDir::new("apiban-ca-");
    let config = dir.path.join("config.toml");
    std::fs::write(&config, "").unwrap();
    let config = config.display().to_string();
    let ca_file = dir.path.join("mirror-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let ca_path = ca_file.display().to_string();
    let url = server.base_url();
    assert!(url.starts_with("https://"), "{url}");
    let env = [("APIBAN_KEY", KEY), ("APIBAN_API_URL", url.as_str())];

    // Neither the bundled web roots nor the system's know this CA.
    let (ok, _, stderr) = check_remote(&config, &env);
    assert!(!ok, "an unknown CA must be refused");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");

    let (ok, stdout, stderr) = check_remote(
        &config,
        &[&env[..], &[("APIBAN_API_CA", ca_path.as_str())]].concat(),
    );
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "45.78.0.1 is LISTED by APIBAN");

    // The system's trust store, as rustls-native-certs reads it (SSL_CERT_FILE points it at
    // a bundle, as update-ca-certificates would build one).
    let (ok, stdout, stderr) = check_remote(
        &config,
        &[&env[..], &[("SSL_CERT_FILE", ca_path.as_str())]].concat(),
    );
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "45.78.0.1 is LISTED by APIBAN");

    let bad = dir.path.join("not-a-ca.pem");
    std::fs::write(&bad, "this is not PEM\n").unwrap();
    let bad_path = bad.display().to_string();
    let (ok, _, stderr) = check_remote(
        &config,
        &[&env[..], &[("APIBAN_API_CA", bad_path.as_str())]].concat(),
    );
    assert!(!ok);
    assert!(stderr.contains("not-a-ca.pem"), "{stderr}");
    assert!(stderr.contains("no PEM certificate"), "{stderr}");
    let (ok, _, stderr) = check_remote(
        &config,
        &[&env[..], &[("APIBAN_API_CA", "/nonexistent/ca.pem")]].concat(),
    );
    assert!(!ok);
    assert!(
        stderr.contains("cannot read the --api-ca file /nonexistent/ca.pem"),
        "{stderr}"
    );
}
