//! The Postgres sink over TLS, against the real Postgres that scripts/pg.sh starts with `ssl = on`:
//! `sslmode=require` writes over TLS (the server's `pg_stat_ssl` says so for the sink's session),
//! the server's own certificate as `tls_root_cert` passes "ca" and, connecting by the name it
//! holds, "full"; a root that did not issue it, a host name it does not hold, or a root file that
//! is not there stop `sluice run` at start-up (exit 1) with a message naming the field; settings
//! that contradict the URL are refused when the topology is read; and `sslmode=disable` still
//! writes in plain text. The server's certificate is read through the
//! server (`pg_read_file` of its `ssl_cert_file`); other certificates are made with openssl.

mod common;

use common::blackbox::*;
use common::kafka::unique;
use common::*;
use sluice::connectors::postgres::sink::PostgresConfig;
use sluice::record::{Answer, Change, Column, ColumnKind, SourcePos, Value};
use sluice::sink::{EpochBatch, SinkContext, SinkFactory};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

static COLUMNS: [Column; 1] = [Column { name: "duration", kind: ColumnKind::Float }];

/// The server's certificate, written to `dir`. Panics unless the server offers TLS.
fn server_cert(dir: &Path) -> PathBuf {
    let ssl: String = query("SHOW ssl")[0].get(0);
    assert_eq!(ssl, "on", "the test Postgres does not offer TLS: run scripts/pg.sh, which turns ssl on");
    let pem: String = query("SELECT pg_read_file(current_setting('ssl_cert_file'))")[0].get(0);
    let path = dir.join("server.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

/// The subject alternative names of the certificate at `path` (`DNS:x`, `IP Address:y`), by openssl.
fn cert_names(path: &Path) -> Vec<String> {
    let out = Command::new("openssl").args(["x509", "-noout", "-ext", "subjectAltName", "-in"]).arg(path).output().expect("openssl");
    assert!(out.status.success(), "openssl x509: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines().skip(1).flat_map(|l| l.split(',')).map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()
}

/// The subject of the certificate at `path`, as openssl's `-subj` takes it (`/CN=localhost`).
fn cert_subject(path: &Path) -> String {
    let out = Command::new("openssl").args(["x509", "-noout", "-subject", "-nameopt", "compat", "-in"]).arg(path).output().expect("openssl");
    assert!(out.status.success(), "openssl x509: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("subject=").to_string()
}

/// A new self-signed certificate with `subject`, in `dir` as `file`: it issued nothing the
/// server holds.
fn other_root(dir: &Path, subject: &str, file: &str) -> PathBuf {
    let cert = dir.join(file);
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", subject])
        .args(["-addext", "basicConstraints=critical,CA:TRUE", "-keyout"])
        .arg(dir.join(format!("{file}.key")))
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl req -x509 failed");
    cert
}

/// The test server's address as a key-value connection string, with `host` (the name TLS
/// checks), `hostaddr` (where it connects, when given) and `extra` settings.
fn key_value_url(host: &str, hostaddr: Option<&str>, extra: &str) -> String {
    let c: tokio_postgres::Config = pg_url().parse().unwrap();
    let user = c.get_user().unwrap_or("sluice");
    let password = String::from_utf8_lossy(c.get_password().unwrap_or(b"")).to_string();
    let db = c.get_dbname().unwrap_or(user);
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let addr = hostaddr.map(|a| format!(" hostaddr={a}")).unwrap_or_default();
    format!("host={host}{addr} port={port} user={user} password='{password}' dbname={db} {extra}")
}

/// The IP address the test server is reached at.
fn server_ip() -> String {
    use std::net::ToSocketAddrs;
    let c: tokio_postgres::Config = pg_url().parse().unwrap();
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        other => panic!("the test Postgres must be reached over TCP, not {other:?}"),
    };
    (host.as_str(), 5432).to_socket_addrs().unwrap().next().unwrap().ip().to_string()
}

/// `pg_url()` with more URL parameters.
fn url_with(params: &str) -> String {
    let url = pg_url();
    format!("{url}{}{params}", if url.contains('?') { '&' } else { '?' })
}

fn sink_config(url: &str, table: &str, extra: &str) -> PostgresConfig {
    let text = format!("url = \"{}\"\ntable = \"{table}\"\ndead_letter_table = \"{table}_dead\"\n{extra}", url.replace('\\', "\\\\").replace('"', "\\\""));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{e}"))
}

fn answer(id: &str, duration: f64, seq: u64) -> Change {
    Change::Upsert(Answer {
        id: id.into(),
        values: vec![Value::Float(duration)],
        passthrough: Vec::new(),
        model: "rides@tls".into(),
        pos: SourcePos::seq("tls".into(), seq),
        ingest_ms: 0,
        raw: Vec::new(),
        seq,
        replaces: false,
    })
}

/// The `(ssl, version)` of every live session named `app`, once exactly one is left (a session
/// that just closed can linger for a moment).
fn sessions(app: &str) -> Vec<(bool, Option<String>)> {
    let sql = format!(
        "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid WHERE a.application_name = '{app}' AND a.pid <> pg_backend_pid()"
    );
    let mut got = Vec::new();
    wait_until(Duration::from_secs(10), || {
        got = query(&sql).iter().map(|r| (r.get(0), r.get(1))).collect();
        got.len() == 1
    });
    got
}

/// Writes three answers to `table` through the sink as configured (opened as a run opens it,
/// then one worker's writer), and returns how the writer's session is secured.
fn write_three(config: &PostgresConfig, table: &str, app: &str) -> Vec<(bool, Option<String>)> {
    exec(&format!("DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_dead;"));
    let ctx = SinkContext { pipeline: table.to_string(), columns: &COLUMNS, resumable: false, workers: 0..1 };
    config.open(&ctx).unwrap_or_else(|e| panic!("open: {e}"));
    let mut writer = config.writer(&ctx, 0).unwrap();
    let batch =
        EpochBatch { epoch: 1, changes: vec![answer("a", 1.5, 1), answer("b", 2.5, 2), answer("c", 3.5, 3)], dead: Vec::new(), checkpoints: Vec::new() };
    writer.write(&batch).unwrap_or_else(|e| panic!("write: {e}"));
    let rows: Vec<(String, f64)> = query(&format!("SELECT id, duration FROM {table} ORDER BY id")).iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, vec![("a".into(), 1.5), ("b".into(), 2.5), ("c".into(), 3.5)]);
    let secured = sessions(app);
    drop(writer);
    secured
}

fn assert_tls(sessions: &[(bool, Option<String>)]) {
    assert_eq!(sessions.len(), 1, "one session of the sink's writer: {sessions:?}");
    assert!(sessions[0].0, "the sink's session is not encrypted: {sessions:?}");
    assert!(sessions[0].1.as_deref().is_some_and(|v| v.starts_with("TLSv1.")), "TLS version: {sessions:?}");
}

#[test]
fn sslmode_require_writes_answers_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    server_cert(dir.path());
    let config = sink_config(&url_with("sslmode=require&application_name=it_tls_require"), "it_tls_require", "");
    assert_tls(&write_three(&config, "it_tls_require", "it_tls_require"));
}

#[test]
fn sslmode_disable_still_writes_in_plain_text() {
    let config = sink_config(&url_with("sslmode=disable&application_name=it_tls_disable"), "it_tls_disable", "");
    assert_eq!(write_three(&config, "it_tls_disable", "it_tls_disable"), vec![(false, None)]);
}

/// Connecting by a name the certificate holds (`host`), at the server's address (`hostaddr`),
/// "full" (the default with a root) passes; libpq's spelling in the URL does the same.
#[test]
fn verify_full_passes_with_a_name_the_certificate_holds() {
    let dir = tempfile::tempdir().unwrap();
    let cert = server_cert(dir.path());
    let names = cert_names(&cert);
    let name = names.iter().find_map(|n| n.strip_prefix("DNS:")).unwrap_or_else(|| panic!("the server's certificate names no host: {names:?}"));
    let ip = server_ip();
    let url = key_value_url(name, Some(&ip), "application_name=it_tls_full");
    let config = sink_config(&url, "it_tls_full", &format!("tls_root_cert = \"{}\"\n", cert.display()));
    assert_tls(&write_three(&config, "it_tls_full", "it_tls_full"));
    let url = key_value_url(name, Some(&ip), &format!("application_name=it_tls_full_libpq sslmode=verify-full sslrootcert='{}'", cert.display()));
    let config = sink_config(&url, "it_tls_full_libpq", "");
    assert_tls(&write_three(&config, "it_tls_full_libpq", "it_tls_full_libpq"));
}

/// A rides topology over a CSV of `n` rides into the Postgres table `table`, with `sink_extra` lines.
fn rides_topology(dir: &Path, name: &str, n: usize, url: &str, table: &str, sink_extra: &str) -> String {
    let mut csv = String::from("id,PULocationID,DOLocationID,trip_distance\n");
    for i in 0..n {
        csv.push_str(&format!("r{i},{},{},{:.2}\n", 1 + i * 7 % 260, 1 + i * 13 % 260, 0.5 + i as f64 * 0.1));
    }
    let input = dir.join(format!("{name}.csv"));
    std::fs::write(&input, csv).unwrap();
    format!(
        "name = \"{name}\"\n[source]\ntype = \"csv\"\npath = \"{}\"\n[task]\ntype = \"tabular\"\nmodel = \"{}/models/rides/model.onnx\"\n[runtime]\nprogress = false\n[[sinks]]\ntype = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"\ndead_letter_table = \"{table}_dead\"\n{sink_extra}",
        input.display(),
        env!("CARGO_MANIFEST_DIR"),
    )
}

/// Runs `sluice run` to its end (at most 60 s) and returns its exit code and stderr.
fn run_sluice(dir: &Path, topology: &str) -> (Option<i32>, String) {
    let mut p = spawn_sluice(dir, topology, &["--workers", "1"], &[]);
    let status = p.wait_timeout(Duration::from_secs(60));
    p.kill();
    (status.and_then(|s| s.code()), p.stderr())
}

#[test]
fn the_servers_certificate_as_root_passes_verify_ca() {
    let dir = tempfile::tempdir().unwrap();
    let cert = server_cert(dir.path());
    exec("DROP TABLE IF EXISTS it_tls_ca; DROP TABLE IF EXISTS it_tls_ca_dead;");
    let extra = format!("tls_root_cert = \"{}\"\ntls_verify = \"ca\"\n", cert.display());
    let text = rides_topology(dir.path(), &unique("it_tls_ca"), 25, &pg_url(), "it_tls_ca", &extra);
    let (code, stderr) = run_sluice(dir.path(), &text);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert_eq!(count_rows("it_tls_ca"), 25);
}

/// The README: a configuration error stops the run at start-up, exit 1, with the message.
fn assert_refused(dir: &Path, name: &str, table: &str, url: &str, sink_extra: &str, expect: &[&str]) {
    exec(&format!("DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_dead;"));
    let text = rides_topology(dir, &unique(name), 5, url, table, sink_extra);
    let (code, stderr) = run_sluice(dir, &text);
    assert_eq!(code, Some(1), "a configuration error exits 1 at start-up; stderr:\n{stderr}");
    for e in expect {
        assert!(stderr.contains(e), "stderr lacks {e:?}:\n{stderr}");
    }
    assert!(stderr.contains("\n  hint: "), "a hint: {stderr}");
    assert!(!stderr.contains("cannot connect to Postgres"), "a TLS refusal is no connection error: {stderr}");
    assert_eq!(count_rows(table), 0, "nothing was created or written");
}

/// Another CA, and a certificate with the very name of the server's (a second self-signed
/// certificate for the same host) but another key.
#[test]
fn a_root_that_did_not_issue_the_servers_certificate_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let cert = server_cert(dir.path());
    let other_ca = other_root(dir.path(), "/CN=sluice test CA", "other-ca.pem");
    let extra = format!("tls_root_cert = \"{}\"\ntls_verify = \"ca\"\n", other_ca.display());
    let named = format!("failed verification against sinks.tls_root_cert ({}): no certificate there issued it", other_ca.display());
    assert_refused(dir.path(), "it_tls_other_ca", "it_tls_other_ca", &pg_url(), &extra, &[&named]);
    let same_name = other_root(dir.path(), &cert_subject(&cert), "same-name.pem");
    let extra = format!("tls_root_cert = \"{}\"\ntls_verify = \"ca\"\n", same_name.display());
    let named =
        format!("failed verification against sinks.tls_root_cert ({}): a certificate there has the name of its issuer but another key", same_name.display());
    assert_refused(dir.path(), "it_tls_same_name", "it_tls_same_name", &pg_url(), &extra, &[&named]);
}

#[test]
fn verify_full_refuses_an_address_the_certificate_does_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let cert = server_cert(dir.path());
    let ip = server_ip();
    let names = cert_names(&cert);
    assert!(!names.contains(&format!("IP Address:{ip}")), "the server's certificate names {ip}, so this test cannot check a mismatch: {names:?}");
    let url = key_value_url(&ip, None, "");
    let extra = format!("tls_root_cert = \"{}\"\ntls_verify = \"full\"\n", cert.display());
    let named = format!("certificate does not match the host name `{ip}`");
    assert_refused(dir.path(), "it_tls_name", "it_tls_name", &url, &extra, &[&named, "tls_verify = \"ca\""]);
}

#[test]
fn a_root_file_that_is_not_there_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let extra = format!("tls_root_cert = \"{}\"\n", missing.display());
    let named = format!("sinks.tls_root_cert: cannot read {}", missing.display());
    assert_refused(dir.path(), "it_tls_missing_root", "it_tls_missing_root", &pg_url(), &extra, &[&named]);
}

/// Why the topology `text` is refused.
fn refusal(text: &str) -> String {
    match sluice::registry::parse("tls.toml", text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// A URL and fields that disagree are refused when the topology is read (`sluice validate`
/// too), naming the field and the fix, before any connection.
#[test]
fn settings_that_contradict_the_url_are_refused_when_the_topology_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let text = rides_topology(dir.path(), "it_tls_conflict", 1, &url_with("sslmode=verify-ca"), "it_tls_conflict", "tls_verify = \"full\"\n");
    let e = refusal(&text);
    assert!(e.contains("sinks[0].tls_verify") && e.contains("\"full\" contradicts sslmode=verify-ca in the url"), "{e}");
    assert!(e.contains("hint: say it once: remove sslmode from the url, or remove tls_verify"), "{e}");
    let text = rides_topology(dir.path(), "it_tls_conflict", 1, &url_with("sslmode=disable"), "it_tls_conflict", "tls_root_cert = \"/etc/ca.pem\"\n");
    let e = refusal(&text);
    assert!(e.contains("sinks[0].url") && e.contains("says sslmode=disable, but the server's certificate is to be verified"), "{e}");
}
