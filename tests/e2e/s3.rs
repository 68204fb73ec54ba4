//! Artifacts in an S3-compatible bucket (`--artifacts s3://…`) against a
//! real S3-protocol server the tests start: moto's (`moto[server]` from the
//! package index, in a venv under the target dir), on a loopback port, with
//! signatures checked (an IAM user and key made at start), a bucket per test.
//!
//! A version registered through one instance (PostgreSQL store, artifacts in
//! the bucket) is served by another on a fresh data dir, its artifact in the
//! bucket and not in PostgreSQL; a corrupted cached copy is fetched again;
//! blobs of several parts go up as multipart uploads and come back whole,
//! once; a wrong key or a missing bucket stops `ferry serve` with what to
//! check.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferry::store::{BlobStore, BucketUrl, S3Blobs};
use serde_json::Value;

use super::harness::{Server, batch, ferry_binary, python_with};
use super::testpg;

/// moto's S3 server, one per test process, stopped when the process ends.
struct Moto {
    python: PathBuf,
    endpoint: String,
    key_id: String,
    secret: String,
    _child: Child,
}

fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(Moto::start)
}

impl Moto {
    fn start() -> Moto {
        let bin = python_with("moto", &["moto[server]==5.2.5"]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        // Requests after the first three must be signed by a known key: the
        // three make the user, its key and its policy.
        let child = Command::new(bin.join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        stop_with_this_process(child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let endpoint = format!("http://127.0.0.1:{port}");
        let script = r#"
import boto3, sys
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="setup", aws_secret_access_key="setup")
iam.create_user(UserName="ferry")
key = iam.create_access_key(UserName="ferry")["AccessKey"]
iam.put_user_policy(UserName="ferry", PolicyName="all", PolicyDocument=
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}')
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
        let python = bin.join("python");
        let out = Command::new(&python)
            .args(["-c", script, &endpoint])
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (key_id, secret) = text.trim().split_once(' ').expect("a key and its secret");
        Moto {
            python,
            endpoint,
            key_id: key_id.to_string(),
            secret: secret.to_string(),
            _child: child,
        }
    }

    /// The AWS environment a Ferry needs to reach this server.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", &self.key_id),
            ("AWS_SECRET_ACCESS_KEY", &self.secret),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Runs boto3 code with `s3` a client signed with the key; its stdout.
    fn boto3(&self, code: &str, args: &[&str]) -> String {
        let script = format!(
            "import boto3, sys\ns3 = boto3.client('s3', endpoint_url={:?}, region_name='us-east-1', aws_access_key_id={:?}, aws_secret_access_key={:?})\n{code}",
            self.endpoint, self.key_id, self.secret
        );
        let out = Command::new(&self.python)
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A new empty bucket.
    fn bucket(&self) -> String {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("ferry-test-{}-{n}", std::process::id());
        self.boto3("s3.create_bucket(Bucket=sys.argv[1])", &[&name]);
        name
    }

    /// Every object in `bucket`: key, size and ETag.
    fn objects(&self, bucket: &str) -> Vec<(String, u64, String)> {
        let listed = self.boto3(
            "for o in s3.list_objects_v2(Bucket=sys.argv[1]).get('Contents', []):\n    print(o['Key'], o['Size'], o['ETag'].strip('\"'))",
            &[bucket],
        );
        listed
            .lines()
            .map(|line| {
                let mut parts = line.split(' ');
                let key = parts.next().unwrap().to_string();
                let size = parts.next().unwrap().parse().unwrap();
                (key, size, parts.next().unwrap().to_string())
            })
            .collect()
    }
}

/// A watcher that kills `pid` once this test process has ended, however it
/// ends (the server is a static, never dropped).
fn stop_with_this_process(pid: u32) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill {pid} 2>/dev/null",
        me = std::process::id()
    );
    let mut watcher = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the watcher starts");
    std::thread::spawn(move || watcher.wait());
}

/// Bytes that do not compress, the same every run.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn start(dir: &std::path::Path, args: &[&str], env: &[(String, String)]) -> Server {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = Server::spawn(&[], &env, dir, args, Stdio::inherit());
    server.wait_ready().await;
    server
}

async fn answer(s: &Server) -> (String, Value) {
    let (status, headers, body) = s.infer("/v2/models/cancer/infer", &batch(3)).await;
    assert_eq!(status, 200, "{body}");
    let version = headers["x-ferry-version"].to_str().unwrap().to_string();
    (version, body["outputs"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_registered_with_artifacts_in_a_bucket_is_served_by_another_instance() {
    let (moto, url) = (moto(), testpg::database());
    let bucket = moto.bucket();
    let artifacts = format!("s3://{bucket}/models/prod");
    let args = ["--store", url.as_str(), "--artifacts", artifacts.as_str()];
    let tmp = tempfile::tempdir().unwrap();
    let a = start(&tmp.path().join("a"), &args, &moto.env()).await;
    let added = a.add("cancer", "1", "cancer-v1.onnx");
    let digest = added["source"]["digest"].as_str().unwrap().to_string();
    let served = answer(&a).await;

    let objects = moto.objects(&bucket);
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects[0].0, format!("models/prod/sha256/{digest}"));
    let database = url.rsplit('/').next().unwrap();
    let pg = testpg::shared();
    assert_eq!(pg.psql(database, "SELECT count(*) FROM blob_chunks"), "0");
    assert_eq!(pg.psql(database, "SELECT count(*) FROM blobs"), "0");

    let b_dir = tmp.path().join("b");
    let mut b = start(&b_dir, &args, &moto.env()).await;
    assert_eq!(answer(&b).await, served);
    let cached = b_dir.join("blobs/sha256").join(&digest);
    assert!(cached.exists(), "B caches the artifact in its data dir");

    // A corrupted cached copy fails its digest check and is fetched again.
    b.terminate();
    std::fs::write(&cached, b"not the model").unwrap();
    let b = start(&b_dir, &args, &moto.env()).await;
    assert_eq!(answer(&b).await, served);
    assert_ne!(std::fs::read(&cached).unwrap(), b"not the model");
    assert_eq!(moto.objects(&bucket).len(), 1, "nothing was uploaded again");
}

#[test]
fn a_blob_of_several_parts_goes_up_as_one_multipart_upload_and_comes_back_whole() {
    let moto = moto();
    let bucket = moto.bucket();
    let url = BucketUrl::parse(&format!("s3://{bucket}/p")).unwrap();
    let blobs = S3Blobs::open_with(&url, moto.env()).unwrap();
    let part = ferry::store::s3::PART_BYTES;
    let bytes = noise(2 * part + 12345);
    let digest = ferry::registry::blobs::digest(&bytes);
    assert!(!blobs.has_blob(&digest).unwrap());

    // Other bytes under this digest: refused, the upload aborted, nothing seen.
    let other = noise(2 * part + 1);
    let refused = blobs.put_blob(&digest, &mut &other[..]).unwrap_err();
    assert!(
        refused.to_string().contains("nothing was stored"),
        "{refused}"
    );
    assert!(!blobs.has_blob(&digest).unwrap());
    assert!(moto.objects(&bucket).is_empty());

    assert_eq!(
        blobs.put_blob(&digest, &mut &bytes[..]).unwrap(),
        bytes.len() as u64
    );
    let objects = moto.objects(&bucket);
    assert_eq!(objects.len(), 1, "{objects:?}");
    let (key, size, etag) = &objects[0];
    assert_eq!(key, &format!("p/sha256/{digest}"));
    assert_eq!(*size, bytes.len() as u64);
    assert!(etag.ends_with("-3"), "three parts: {etag}");

    let mut back = Vec::new();
    assert!(blobs.get_blob(&digest, &mut back).unwrap());
    assert!(back == bytes, "the blob comes back byte for byte");
    assert_eq!(
        blobs.put_blob(&digest, &mut &bytes[..]).unwrap(),
        0,
        "stored once"
    );
    assert!(!blobs.get_blob(&"0".repeat(64), &mut Vec::new()).unwrap());
}

/// `ferry serve` with `env`, expected to refuse to start: its stderr.
fn refused(env: &[(String, String)], artifacts: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(ferry_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--grpc-listen", "off"])
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["--artifacts", artifacts])
        .envs(env.iter().cloned())
        .output()
        .expect("ferry runs");
    assert!(!out.status.success(), "ferry serve started");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn a_wrong_key_or_a_missing_bucket_stops_serve_with_what_to_check() {
    let moto = moto();
    let bucket = moto.bucket();
    let with = |name: &str, value: &str| {
        let mut env = moto.env();
        env.retain(|(k, _)| k != name);
        env.push((name.to_string(), value.to_string()));
        env
    };
    let artifacts = format!("s3://{bucket}/p");
    let wrong_secret = refused(&with("AWS_SECRET_ACCESS_KEY", "not-the-secret"), &artifacts);
    assert!(
        wrong_secret.contains(&format!("the artifact bucket s3://{bucket}/p failed"))
            && wrong_secret.contains("SignatureDoesNotMatch")
            && wrong_secret.contains("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        "{wrong_secret}"
    );
    assert!(!wrong_secret.contains(&moto.secret), "{wrong_secret}");
    let unknown_key = refused(&with("AWS_ACCESS_KEY_ID", "AKIANOTAKEY"), &artifacts);
    assert!(unknown_key.contains("InvalidAccessKeyId"), "{unknown_key}");

    let missing = refused(&moto.env(), "s3://no-such-ferry-bucket/p");
    assert!(
        missing.contains("the artifact bucket s3://no-such-ferry-bucket/p failed")
            && missing.contains("NoSuchBucket")
            && missing.contains("check that the bucket exists"),
        "{missing}"
    );
    let nowhere = refused(&with("AWS_ENDPOINT_URL", "http://127.0.0.1:1"), &artifacts);
    assert!(nowhere.contains("check AWS_ENDPOINT_URL"), "{nowhere}");
    let malformed = refused(&moto.env(), "gs://elsewhere/p");
    assert!(
        malformed.contains("--artifacts") && malformed.contains("s3://BUCKET/PREFIX"),
        "{malformed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_puts_a_single_nodes_artifacts_in_the_bucket() {
    let (moto, url) = (moto(), testpg::database());
    let bucket = moto.bucket();
    let artifacts = format!("s3://{bucket}/copied");
    let tmp = tempfile::tempdir().unwrap();
    let node = tmp.path().join("node");
    let mut single = Server::start_in(&node, &[]).await;
    let added = single.add("cancer", "1", "cancer-v1.onnx");
    let digest = added["source"]["digest"].as_str().unwrap().to_string();
    let served = answer(&single).await;
    single.terminate();

    let out = Command::new(ferry_binary())
        .args(["store", "copy", "--from"])
        .arg(format!("sqlite:{}", node.display()))
        .args(["--to", &url, "--to-artifacts", &artifacts])
        .envs(moto.env())
        .output()
        .expect("ferry runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("every digest checked"), "{text}");
    let objects = moto.objects(&bucket);
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects[0].0, format!("copied/sha256/{digest}"));
    let database = url.rsplit('/').next().unwrap();
    assert_eq!(
        testpg::shared().psql(database, "SELECT count(*) FROM blob_chunks"),
        "0"
    );

    let args = ["--store", url.as_str(), "--artifacts", artifacts.as_str()];
    let copy = start(&tmp.path().join("copy"), &args, &moto.env()).await;
    assert_eq!(answer(&copy).await, served);
}
