//! Faults under Ferry rather than in its versions: the data dir's disk
//! filling up or becoming read-only during registrations, and remote versions
//! that reset connections.
//!
//! The disk tests give the server a small tmpfs of its own in a private mount
//! namespace (`unshare -m`, as root — CI runs as root), held by a sleeping
//! process so that the server can be killed and restarted on the same disk.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::harness::{
    Server, batch, eventually, example, fails_over_without_errors, remote_then_local,
};
use super::upstream::Upstream;

/// A tmpfs of `size` mounted on `dir` in a mount namespace of its own.
struct SmallDisk {
    holder: Child,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl SmallDisk {
    fn new(size: &str) -> SmallDisk {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        // The server's admin token, known before it starts: the test reads it
        // from `dir` as it sees it (the mount hides that copy from the server).
        let token = tmp.path().join("token");
        std::fs::write(&token, "fault-test-token-0123456789abcdef\n").unwrap();
        std::fs::copy(&token, dir.join("admin-token")).unwrap();
        let mut holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(
                r#"mount -t tmpfs -o size="$3",mode=0700 ferry-test "$1" \
                   && cp "$2" "$1/admin-token" && chmod 600 "$1/admin-token" \
                   && echo mounted && exec sleep 600"#,
            )
            .args([
                "sh".as_ref(),
                dir.as_os_str(),
                token.as_os_str(),
                size.as_ref(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare runs (util-linux)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(
            line.trim(),
            "mounted",
            "could not mount a tmpfs in a private mount namespace (needs root or CAP_SYS_ADMIN)"
        );
        SmallDisk {
            holder,
            dir,
            _tmp: tmp,
        }
    }

    /// `nsenter` into the disk's mount namespace, ready for a command.
    fn prefix(&self) -> Vec<String> {
        let pid = self.holder.id().to_string();
        ["nsenter", "-t", &pid, "-m", "--"]
            .map(str::to_string)
            .to_vec()
    }

    /// Runs a shell command where the disk is mounted (`$D` is the data dir).
    fn sh(&self, script: &str) -> Output {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.holder.id().to_string(),
            "-m",
            "--",
            "sh",
            "-c",
            script,
        ])
        .env("D", &self.dir);
        c.output().unwrap()
    }

    fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn start(&self) -> Server {
        let prefix = self.prefix();
        let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
        Server::start_under(&prefix, &self.dir, &[]).await
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// `ferry model add` that must fail; returns its stderr.
fn add_fails(s: &Server, version: &str, file: &str) -> String {
    let out = s.ferry(&[
        "model",
        "add",
        "cancer",
        version,
        "--file",
        example(file).to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "version {version} was registered");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn serves_version(s: &Server, version: &str) {
    let path = format!("/v2/models/cancer/versions/{version}/infer");
    let (status, _, body) = s.infer(&path, &super::harness::batch(1)).await;
    assert_eq!(status, 200, "version {version}: {body}");
}

fn blob_files(disk: &SmallDisk) -> Vec<String> {
    disk.sh_ok("ls -A \"$D/blobs/sha256\"")
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_full_or_read_only_disk_refuses_registration_clearly_and_corrupts_nothing() {
    let disk = SmallDisk::new("16m");
    let mut s = disk.start().await;
    s.add("cancer", "1", "cancer-v1.onnx");
    serves_version(&s, "1").await;

    // The disk fills up: the registration is refused with the reason and
    // what to do, and nothing of it is left behind.
    disk.sh("dd if=/dev/zero of=\"$D/filler\" bs=64k 2>/dev/null; true");
    let err = add_fails(&s, "2", "cancer-v2.onnx");
    assert!(
        err.contains("disk is full")
            && err.contains("HTTP 507")
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(
        blob_files(&disk).len(),
        1,
        "a partial artifact was left behind"
    );
    // State changes that reach the database are refused the same way (some
    // may still fit in the write-ahead log): never a bare 500.
    let mut refused = 0;
    for replicas in ["2", "1", "2", "1", "2", "1"] {
        let out = s.ferry(&["model", "set", "cancer", "1", "--replicas", replicas]);
        let err = String::from_utf8_lossy(&out.stderr);
        refused += usize::from(!out.status.success());
        assert!(
            out.status.success() || (err.contains("HTTP 507") && err.contains("disk is full")),
            "{err}"
        );
    }
    eprintln!("database writes refused on the full disk: {refused} of 6");
    // Serving never needed the disk.
    serves_version(&s, "1").await;

    // Space comes back: the same registration now succeeds.
    disk.sh_ok("rm \"$D/filler\"");
    s.add("cancer", "2", "cancer-v2.onnx");

    // The artifact store turns read-only: refused with the reason.
    disk.sh_ok(
        "mount --bind \"$D/blobs/sha256\" \"$D/blobs/sha256\" \
         && mount -o remount,bind,ro \"$D/blobs/sha256\"",
    );
    let err = add_fails(&s, "3", "cancer-bad.onnx");
    assert!(
        err.contains("cannot be written")
            && err.contains("HTTP 503")
            && err.contains("nothing was changed"),
        "{err}"
    );
    disk.sh_ok("umount \"$D/blobs/sha256\"");
    s.add("cancer", "3", "cancer-bad.onnx");

    // After a crash, everything acknowledged is there, whole, once.
    s.kill9();
    let s = disk.start().await;
    let versions = s.ferry_json(&["model", "show", "cancer"]);
    let names: Vec<&str> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["1", "2", "3"], "{versions}");
    for v in ["2", "3"] {
        s.load("cancer", v).await; // the digest is verified on load
        serves_version(&s, v).await;
    }
    let registered = s
        .event_kinds("cancer")
        .await
        .iter()
        .filter(|k| *k == "version_registered")
        .count();
    assert_eq!(registered, 3);
    let blobs = blob_files(&disk);
    assert_eq!(blobs.len(), 3, "{blobs:?}");
    assert!(blobs.iter().all(|b| !b.ends_with(".tmp")), "{blobs:?}");
    let check = disk.sh_ok(
        "python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"pragma integrity_check\").fetchone()[0])' \"$D/ferry.db\"",
    );
    assert_eq!(check.trim(), "ok");
}

/// A remote V2 server (the fake of `upstream.rs`) that stays up but, once
/// told to, resets every connection: open ones at once, new ones as soon as
/// a request arrives (SO_LINGER 0, so the peer sees RST, not FIN).
struct ResettingRemote {
    url: String,
    resetting: Arc<AtomicBool>,
    reset_now: tokio::sync::watch::Sender<()>,
    resets: Arc<AtomicU64>,
}

impl ResettingRemote {
    async fn start() -> ResettingRemote {
        use hyper_util::rt::TokioIo;
        use hyper_util::service::TowerToHyperService;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = Upstream::app(Arc::default());
        let resetting = Arc::new(AtomicBool::new(false));
        let resets = Arc::new(AtomicU64::new(0));
        let (reset_now, watch) = tokio::sync::watch::channel(());
        let (flag, count) = (resetting.clone(), resets.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                stream.set_zero_linger().unwrap();
                let (app, mut watch, count) = (app.clone(), watch.clone(), count.clone());
                if flag.load(Ordering::SeqCst) {
                    tokio::spawn(async move {
                        use tokio::io::AsyncReadExt;
                        let mut stream = stream;
                        let mut buf = [0u8; 1024];
                        let read = stream.read(&mut buf);
                        let _ = tokio::time::timeout(Duration::from_secs(1), read).await;
                        count.fetch_add(1, Ordering::SeqCst);
                    });
                    continue;
                }
                let flag = flag.clone();
                tokio::spawn(async move {
                    watch.mark_unchanged();
                    // Told to reset between the accept and here: the watch
                    // missed it, the flag did not.
                    if flag.load(Ordering::SeqCst) {
                        count.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let service = TowerToHyperService::new(app);
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = watch.changed() => { count.fetch_add(1, Ordering::SeqCst); }
                    }
                });
            }
        });
        ResettingRemote {
            url,
            resetting,
            reset_now,
            resets,
        }
    }

    fn set_resetting(&self, on: bool) {
        self.resetting.store(on, Ordering::SeqCst);
        if on {
            self.reset_now.send_replace(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_resets_connections_is_failed_over_and_recovers() {
    let remote = ResettingRemote::start().await;
    let s = Server::start().await;
    let chain = remote_then_local(&s, &remote.url).await;

    // Under load, the remote starts resetting every connection: users see
    // no error, the chain's next version answers.
    fails_over_without_errors(&s, async || remote.set_resetting(true)).await;
    assert!(
        remote.resets.load(Ordering::SeqCst) > 0,
        "no connection was reset"
    );

    // Without a chain, users get an answer that names the remote and the
    // fault, not a bare 500.
    assert_eq!(
        s.set_route("cancer", json!({"stable": "remote", "timeout": "1s"}))
            .await
            .0,
        200
    );
    let (status, _, body) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
    let message = body["error"].as_str().unwrap_or_default();
    eprintln!("without a chain, users saw: {status} {message}");
    assert!(status == 502 || status == 503, "{status} {body}");
    assert!(
        message.contains(remote.url.trim_start_matches("http://")),
        "{message}"
    );

    // Registering another version on the resetting remote is refused with
    // the reason.
    let out = s.ferry(&["model", "add", "cancer", "again", "--url", &remote.url]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("remote endpoint"), "{err}");

    // The remote heals: with the chain back, it serves again once its
    // breaker's probe succeeds.
    assert_eq!(s.set_route("cancer", chain).await.0, 200);
    remote.set_resetting(false);
    let healed = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the remote serves again",
        async || {
            let (status, headers, _) = s.infer("/v2/models/cancer/infer", &batch(1)).await;
            status == 200 && headers["x-ferry-version"] == "remote"
        },
    )
    .await;
    eprintln!(
        "the healed remote served again after {:?}",
        healed.elapsed()
    );
}
