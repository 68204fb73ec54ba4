//! Artifacts in an S3-compatible bucket (`--artifacts s3://BUCKET/PREFIX`):
//! a second [`BlobStore`], through the `object_store` crate, for clusters
//! that would rather keep model weights out of the database.
//!
//! A blob is the object `PREFIX/sha256/<digest>`. Both ways are streamed in
//! parts of [`PART_BYTES`]: an upload is a multipart upload fed from the
//! staged file one part at a time (one part uploading while the next is
//! read; at most [`PARTS_IN_FLIGHT`] parts in memory), and becomes visible only when it is completed,
//! after its digest was checked; a download is ranged reads of one part at a
//! time, written to the cache file as they come. A large model is never in
//! memory whole. An object already there is not uploaded again (same
//! digest, same bytes).
//!
//! The endpoint, region and credentials come from the usual AWS environment
//! variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL` and `AWS_ALLOW_HTTP` for an S3-compatible server…);
//! the bucket is checked when it is opened, so a wrong key, endpoint or
//! bucket stops `ferry serve` with what to check. Calls run on a small
//! runtime of the store's own ([`super::bridge`]).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ObjectStore, PutPayload, RetryConfig};
use sha2::Digest as _;

use super::{BlobStore, StoreError, read_full};

/// The size of one part of an upload and of one ranged read (S3 wants parts
/// of at least 5 MiB but the last).
pub const PART_BYTES: usize = 8 << 20;

/// Parts in memory at once: the next is read while one uploads, then the
/// upload waits for the oldest.
pub const PARTS_IN_FLIGHT: usize = 2;

/// A validated `--artifacts` value: `s3://BUCKET[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketUrl {
    pub bucket: String,
    /// Without leading or trailing slashes; empty for the bucket's root.
    pub prefix: String,
}

impl BucketUrl {
    /// Parses `s3://BUCKET[/PREFIX]`; an error names the value and the form.
    pub fn parse(text: &str) -> Result<BucketUrl, String> {
        let form = "use s3://BUCKET/PREFIX (an S3-compatible bucket; endpoint, region and credentials from the AWS_* environment variables)";
        let Some(rest) = text.strip_prefix("s3://") else {
            return Err(format!("{text:?} is not a bucket URL; {form}"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c);
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
            return Err(format!(
                "{text:?} does not name a valid bucket (3 to 63 lowercase letters, digits, '-' or '.'); {form}"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
            && !prefix.is_empty()
        {
            return Err(format!(
                "{text:?} has an empty, '.' or '..' part in its prefix; {form}"
            ));
        }
        Ok(BucketUrl {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The key of the blob with this digest.
    fn key(&self, digest: &str) -> Key {
        Key::from(self.join(&format!("sha256/{digest}")))
    }

    fn join(&self, rest: &str) -> String {
        match self.prefix.as_str() {
            "" => rest.to_string(),
            prefix => format!("{prefix}/{rest}"),
        }
    }
}

impl std::fmt::Display for BucketUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.as_str() {
            "" => write!(f, "s3://{}", self.bucket),
            prefix => write!(f, "s3://{}/{prefix}", self.bucket),
        }
    }
}

/// A call to the bucket that failed, with what to check.
#[derive(Debug)]
pub struct BucketFailure {
    /// The bucket and prefix, as `--artifacts` gave them.
    pub url: String,
    /// What Ferry was doing ("reading sha256:…").
    pub doing: String,
    pub problem: BucketProblem,
    /// The client's message.
    pub detail: String,
}

/// The kinds of bucket failure an operator fixes differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketProblem {
    /// The credentials were refused or may not do this.
    Credentials,
    /// The bucket does not exist (or is in another region).
    NoBucket,
    /// The endpoint could not be reached.
    Unreachable,
    Other,
}

impl BucketProblem {
    /// Tells the cases apart from the client's error and the server's code
    /// (S3 error codes are in the message).
    fn of(e: &object_store::Error) -> BucketProblem {
        let text = format!("{e:?} {e}");
        let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
        if matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        ) || has(&[
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "403 Forbidden",
            "401 Unauthorized",
            "credential",
        ]) {
            BucketProblem::Credentials
        } else if has(&["NoSuchBucket", "PermanentRedirect", "301 Moved"]) {
            BucketProblem::NoBucket
        } else if has(&["error sending request", "connect", "dns error", "timed out"]) {
            BucketProblem::Unreachable
        } else {
            BucketProblem::Other
        }
    }

    fn advice(self) -> &'static str {
        match self {
            BucketProblem::Credentials => {
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_SESSION_TOKEN), and that they may list, read and write this bucket"
            }
            BucketProblem::NoBucket => {
                "check that the bucket exists (create it first: Ferry does not) and that AWS_REGION is its region"
            }
            BucketProblem::Unreachable => {
                "check AWS_ENDPOINT_URL (and AWS_ALLOW_HTTP=true for an http:// endpoint), and that the network lets Ferry reach it"
            }
            BucketProblem::Other => {
                "check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), the endpoint (AWS_ENDPOINT_URL) and that the bucket exists"
            }
        }
    }
}

impl std::fmt::Display for BucketFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the artifact bucket {} failed {}: {}; {}",
            self.url,
            self.doing,
            self.detail,
            self.problem.advice()
        )
    }
}

/// Artifacts in an S3-compatible bucket (see the module doc).
pub struct S3Blobs {
    client: Arc<dyn ObjectStore>,
    url: BucketUrl,
    /// Runs every call; shut down without waiting when dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for S3Blobs {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl S3Blobs {
    /// Builds the client from the AWS environment variables and checks that
    /// the bucket answers to a listing of the prefix.
    pub fn open(url: &BucketUrl) -> Result<S3Blobs, StoreError> {
        S3Blobs::open_with(url, std::env::vars())
    }

    /// [`Self::open`] with the `AWS_*` variables taken from `vars` rather
    /// than the process's environment (tests).
    pub fn open_with(
        url: &BucketUrl,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<S3Blobs, StoreError> {
        let fail = |doing: &str, detail: String| {
            StoreError::Bucket(BucketFailure {
                url: url.to_string(),
                doing: doing.to_string(),
                problem: BucketProblem::Other,
                detail,
            })
        };
        let mut builder = AmazonS3Builder::new();
        for (key, value) in vars {
            if key.starts_with("AWS_")
                && let Ok(key) = key.to_ascii_lowercase().parse()
            {
                builder = builder.with_config(key, value);
            }
        }
        let client = builder
            .with_bucket_name(&url.bucket)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
            })
            .build()
            .map_err(|e| fail("to be configured", e.to_string()))?;
        let runtime = super::bridge::runtime("ferry-bucket", 2)
            .map_err(|e| fail("to start", format!("cannot start its threads: {e}")))?;
        let blobs = S3Blobs {
            client: Arc::new(client),
            url: url.clone(),
            runtime: Some(runtime),
        };
        blobs.check()?;
        Ok(blobs)
    }

    /// The bucket and prefix, for logs.
    pub fn url(&self) -> &BucketUrl {
        &self.url
    }

    /// Lists the prefix: the credentials, the endpoint and the bucket work.
    fn check(&self) -> Result<(), StoreError> {
        let client = self.client.clone();
        let prefix = Key::from(self.url.join("sha256"));
        self.call(|| "when listing its prefix".to_string(), async move {
            client.list_with_delimiter(Some(&prefix)).await
        })?;
        Ok(())
    }

    /// Runs one call on the store's runtime and waits for it.
    fn raw<T, F>(&self, work: F) -> object_store::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the store");
        super::bridge::wait(runtime, work).unwrap_or_else(|| {
            Err(object_store::Error::Generic {
                store: "S3",
                source: "Ferry is shutting down".into(),
            })
        })
    }

    /// [`Self::raw`], its error saying what failed and what to check.
    fn call<T, F>(&self, doing: impl FnOnce() -> String, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = object_store::Result<T>> + Send + 'static,
    {
        self.raw(work).map_err(|e| self.failure(doing(), e))
    }

    fn failure(&self, doing: String, e: object_store::Error) -> StoreError {
        StoreError::Bucket(BucketFailure {
            url: self.url.to_string(),
            doing,
            problem: BucketProblem::of(&e),
            detail: short(&e.to_string()),
        })
    }

    /// The size of the blob's object; None when there is none.
    fn size(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        let (client, key) = (self.client.clone(), self.url.key(digest));
        match self.raw(async move { client.head(&key).await }) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failure(format!("when looking for sha256:{digest}"), e)),
        }
    }

    /// Uploads a blob of several parts: `first` (full) and the rest read from
    /// `from`; completed only when the bytes have `digest`, aborted otherwise.
    fn put_parts(
        &self,
        digest: &str,
        first: Vec<u8>,
        from: &mut dyn std::io::Read,
    ) -> Result<u64, StoreError> {
        let doing = || format!("when uploading sha256:{digest}");
        let (client, key) = (self.client.clone(), self.url.key(digest));
        let mut upload = self.call(doing, async move { client.put_multipart(&key).await })?;
        let runtime = self.runtime.as_ref().expect("the runtime lives");
        let (mut hasher, mut size) = (sha2::Sha256::new(), 0u64);
        let mut in_flight = VecDeque::new();
        let mut part = first;
        let sent = loop {
            hasher.update(&part);
            size += part.len() as u64;
            let last = part.len() < PART_BYTES;
            in_flight
                .push_back(runtime.spawn(upload.put_part(PutPayload::from(Bytes::from(part)))));
            if (in_flight.len() >= PARTS_IN_FLIGHT || last)
                && let Err(e) = self.settle(&mut in_flight, last, doing)
            {
                break Err(e);
            }
            if last {
                break Ok(());
            }
            part = match read_part(digest, from) {
                Ok(next) if next.is_empty() => {
                    break self.settle(&mut in_flight, true, doing);
                }
                Ok(next) => next,
                Err(e) => break Err(e),
            };
        };
        let actual = hex::encode(hasher.finalize());
        let refused = match sent {
            Err(e) => Some(e),
            Ok(()) if actual != digest => Some(mismatch(digest, &actual)),
            Ok(()) => None,
        };
        if let Some(e) = refused {
            let _ = self.raw(async move { upload.abort().await });
            return Err(e);
        }
        self.call(doing, async move { upload.complete().await })?;
        Ok(size)
    }

    /// Waits for the oldest part on the wire (every part when `all`).
    fn settle(
        &self,
        in_flight: &mut VecDeque<tokio::task::JoinHandle<object_store::Result<()>>>,
        all: bool,
        doing: impl Fn() -> String,
    ) -> Result<(), StoreError> {
        while let Some(part) = in_flight.pop_front() {
            let joined = self.raw(async move {
                part.await
                    .map_err(|e| object_store::Error::JoinError { source: e })?
            });
            joined.map_err(|e| self.failure(doing(), e))?;
            if !all && in_flight.len() < PARTS_IN_FLIGHT {
                break;
            }
        }
        Ok(())
    }
}

impl BlobStore for S3Blobs {
    fn has_blob(&self, digest: &str) -> Result<bool, StoreError> {
        Ok(self.size(digest)?.is_some())
    }

    fn put_blob(&self, digest: &str, from: &mut dyn std::io::Read) -> Result<u64, StoreError> {
        if self.has_blob(digest)? {
            return Ok(0);
        }
        let first = read_part(digest, from)?;
        if first.len() == PART_BYTES {
            return self.put_parts(digest, first, from);
        }
        let actual = hex::encode(sha2::Sha256::digest(&first));
        if actual != digest {
            return Err(mismatch(digest, &actual));
        }
        let size = first.len() as u64;
        let (client, key) = (self.client.clone(), self.url.key(digest));
        let payload = PutPayload::from(Bytes::from(first));
        self.call(|| format!("when uploading sha256:{digest}"), async move {
            client.put(&key, payload).await
        })?;
        Ok(size)
    }

    fn get_blob(&self, digest: &str, to: &mut dyn std::io::Write) -> Result<bool, StoreError> {
        let Some(size) = self.size(digest)? else {
            return Ok(false);
        };
        let mut at = 0u64;
        while at < size {
            let end = size.min(at + PART_BYTES as u64);
            let (client, key) = (self.client.clone(), self.url.key(digest));
            let bytes = self.call(
                || format!("when reading sha256:{digest} (bytes {at}..{end})"),
                async move { client.get_range(&key, at..end).await },
            )?;
            to.write_all(&bytes).map_err(|e| StoreError::Corrupt {
                what: format!("artifact sha256:{digest}"),
                reason: format!("cannot be written where it is cached: {e}"),
            })?;
            at = end;
        }
        Ok(true)
    }
}

/// Reads the next part (shorter only at the end; empty when nothing is left).
fn read_part(digest: &str, from: &mut dyn std::io::Read) -> Result<Vec<u8>, StoreError> {
    let mut part = vec![0u8; PART_BYTES];
    let n = read_full(from, &mut part).map_err(|e| StoreError::Corrupt {
        what: format!("artifact sha256:{digest}"),
        reason: format!("cannot be read: {e}"),
    })?;
    part.truncate(n);
    Ok(part)
}

/// The client's message with an S3 error document cut down to its code and
/// message (the rest is request ids).
fn short(detail: &str) -> String {
    let Some(at) = detail.find("<?xml") else {
        return detail.to_string();
    };
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let from = detail[at..].find(&open)? + at + open.len();
        let to = detail[from..].find('<')? + from;
        Some(detail[from..to].to_string())
    };
    let head = detail[..at].trim_end().trim_end_matches(':');
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("{head}: {code} ({message})"),
        (Some(code), None) => format!("{head}: {code}"),
        _ => head.to_string(),
    }
}

fn mismatch(digest: &str, actual: &str) -> StoreError {
    StoreError::Corrupt {
        what: format!("artifact sha256:{digest}"),
        reason: format!("its bytes have sha256 {actual}; nothing was stored"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_url_names_the_bucket_and_a_prefix_without_slashes() {
        let url = BucketUrl::parse("s3://ferry-artifacts/prod/models/").unwrap();
        assert_eq!(url.bucket, "ferry-artifacts");
        assert_eq!(url.prefix, "prod/models");
        assert_eq!(url.to_string(), "s3://ferry-artifacts/prod/models");
        assert_eq!(url.key("ab12").as_ref(), "prod/models/sha256/ab12");
        let root = BucketUrl::parse("s3://ferry-artifacts").unwrap();
        assert_eq!(root.prefix, "");
        assert_eq!(root.key("ab12").as_ref(), "sha256/ab12");
        assert_eq!(root.to_string(), "s3://ferry-artifacts");
    }

    #[test]
    fn a_value_that_is_not_a_bucket_url_is_refused_with_the_form() {
        for bad in [
            "ferry-artifacts",
            "gs://ferry-artifacts/x",
            "s3://",
            "s3://No_Caps",
            "s3://ok-bucket/a//b",
            "s3://ok-bucket/a/../b",
        ] {
            let e = BucketUrl::parse(bad).unwrap_err();
            assert!(e.contains("s3://BUCKET/PREFIX"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_failure_names_the_bucket_and_what_to_check() {
        let refused = object_store::Error::Generic {
            store: "S3",
            source: "Client error with status 403 Forbidden: <Code>InvalidAccessKeyId</Code>"
                .into(),
        };
        assert_eq!(BucketProblem::of(&refused), BucketProblem::Credentials);
        let missing = object_store::Error::Generic {
            store: "S3",
            source: "<Code>NoSuchBucket</Code>".into(),
        };
        assert_eq!(BucketProblem::of(&missing), BucketProblem::NoBucket);
        let failure = BucketFailure {
            url: "s3://b-1/p".into(),
            doing: "when listing its prefix".into(),
            problem: BucketProblem::of(&missing),
            detail: missing.to_string(),
        };
        let text = failure.to_string();
        assert!(
            text.starts_with("the artifact bucket s3://b-1/p failed when listing its prefix"),
            "{text}"
        );
        assert!(text.contains("check that the bucket exists"), "{text}");
    }

    #[test]
    fn an_s3_error_document_is_cut_to_its_code_and_message() {
        let detail = "GET http://h/b - 403 Forbidden: <?xml version=\"1.0\"?>\n<Error><Code>SignatureDoesNotMatch</Code><Message>Check your key.</Message><RequestId>X</RequestId></Error>";
        assert_eq!(
            short(detail),
            "GET http://h/b - 403 Forbidden: SignatureDoesNotMatch (Check your key.)"
        );
        assert_eq!(short("error sending request"), "error sending request");
    }
}
