//! A real `sluice serve` process for the integration tests, and a small HTTP/1.1 client over a
//! socket (one connection per request, chunked replies read whole).

use super::blackbox::sluice_bin;
use super::repo;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `sluice serve` child, killed when dropped.
pub struct Server {
    pub child: Option<Child>,
    pub addr: String,
    pub err_path: PathBuf,
    pub token: Option<String>,
}

impl Server {
    /// Starts `sluice serve` with this config text (the state folder and the listen address are
    /// given on the command line), from the repository root so the bundled models are found.
    pub fn start(dir: &Path, config: &str, env: &[(&str, &str)]) -> Server {
        let cfg = dir.join("serve.toml");
        std::fs::write(&cfg, config).unwrap();
        let err_path = dir.join(format!("serve-{}.stderr", std::process::id() as u128 * 1000 + Instant::now().elapsed().as_nanos() % 1000));
        let mut cmd = Command::new(sluice_bin());
        cmd.current_dir(repo())
            .args(["serve", "--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0", "--state", dir.join("state").to_str().unwrap()])
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(std::fs::File::create(&err_path).unwrap()).spawn().expect("start sluice serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().rsplit("http://").next().unwrap_or_default().to_string();
        assert!(addr.contains(':'), "sluice serve did not say where it listens: {line:?}; stderr:\n{}", std::fs::read_to_string(&err_path).unwrap_or_default());
        Server { child: Some(child), addr, err_path, token: None }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err_path).unwrap_or_default()
    }

    pub fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut all: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if let Some(t) = &self.token {
            all.push(("Authorization".into(), format!("Bearer {t}")));
        }
        http(&self.addr, method, path, &all, body)
    }

    pub fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[], b"")
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.call("POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
    }

    pub fn upload(&self, model: &str, name: &str, file: &[u8], extra: &[(&str, &str)]) -> Reply {
        let (ct, body) = multipart(&[("model", None, model.as_bytes())], ("file", name, file));
        let mut headers = vec![("Content-Type", ct.as_str())];
        headers.extend_from_slice(extra);
        self.call("POST", "/v1/jobs/upload", &headers, &body)
    }

    pub fn job(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/jobs/{id}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Polls a job until its status is final; every status seen, with the answers count.
    pub fn wait_final(&self, id: &str, within: Duration) -> (Value, Vec<(String, u64)>) {
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let j = self.job(id);
            let status = j["status"].as_str().unwrap().to_string();
            seen.push((status.clone(), j["counts"]["answered"].as_u64().unwrap()));
            if ["succeeded", "failed", "canceled"].contains(&status.as_str()) {
                return (j, seen);
            }
            assert!(start.elapsed() < within, "job {id} still {status} after {within:?}: {j}\nstderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every line of a job's answers (or dead letters), fetched in pages of `page` lines.
    pub fn lines(&self, id: &str, kind: &str, page: u64) -> Vec<Value> {
        self.raw_lines(id, kind, page).iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The IDs of a job's answers, fetched in pages of `page` lines; each line's prediction
    /// must be a positive number.
    pub fn ride_ids(&self, id: &str, page: u64) -> Vec<String> {
        self.raw_lines(id, "answers", page)
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                assert!(v["prediction"].as_f64().is_some_and(|p| p.is_finite() && p > 0.0), "an answer without the model's prediction: {l}");
                v["id"].as_str().unwrap().to_string()
            })
            .collect()
    }

    pub fn raw_lines(&self, id: &str, kind: &str, page: u64) -> Vec<String> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/jobs/{id}/{kind}?limit={page}&cursor={c}"),
                None => format!("/v1/jobs/{id}/{kind}?limit={page}"),
            };
            let r = self.get(&path);
            assert_eq!(r.status, 200, "{}", r.text());
            let got: Vec<String> = r.text().lines().filter(|l| !l.is_empty()).map(String::from).collect();
            assert!(got.len() as u64 <= page, "a page of {} lines for limit {page}", got.len());
            out.extend(got);
            match r.headers.get("sluice-next-cursor") {
                Some(c) => cursor = Some(c.clone()),
                None => return out,
            }
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap();
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(s) = c.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

/// One HTTP/1.1 request on its own connection; reads the whole reply (chunked or not).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before it has read a large body: a failed write is not an error.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no HTTP reply head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: HashMap<String, String> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        body = dechunk(&body);
    }
    Reply { status, headers, body }
}

pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// A multipart/form-data body: text fields, then one file field.
pub fn multipart(fields: &[(&str, Option<&str>, &[u8])], file: (&str, &str, &[u8])) -> (String, Vec<u8>) {
    let boundary = "sluice-test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, _, value) in fields {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes());
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\nContent-Type: text/csv\r\n\r\n", file.0, file.1).as_bytes(),
    );
    body.extend_from_slice(file.2);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}
