//! `ferry store copy`: moves a Ferry's whole state from one store to another
//! (a single node's data dir into the PostgreSQL a cluster shares). It opens
//! both stores itself, like `serve` does: stop the servers that use the
//! source first, so that nothing changes while it is copied.

use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;

use super::Output;
use crate::registry::Blobs;
use crate::registry::copy::{self, Artifacts, Copied, End};
use crate::server::{OpenedStore, open_store};
use crate::store::{BucketUrl, StoreUrl};

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Copy models, versions, artifacts, routes, rollouts and every event
    /// (ids, order and timestamps kept) into another store, then check the
    /// copy's counts and artifact digests. Stop the servers using the source
    /// first.
    Copy {
        /// The store to copy: sqlite:DATA_DIR (a single node's data dir) or
        /// postgres://USER@HOST:PORT/DB.
        #[arg(long, value_name = "URL")]
        from: String,
        /// The store to copy into (it must be empty unless --replace).
        #[arg(long, value_name = "URL")]
        to: String,
        /// Where the source's artifacts are, when in a bucket (the
        /// --artifacts it was served with): s3://BUCKET/PREFIX.
        #[arg(long, value_name = "URL")]
        from_artifacts: Option<String>,
        /// Put the copy's artifacts in this bucket (the --artifacts its
        /// servers will use): s3://BUCKET/PREFIX.
        #[arg(long, value_name = "URL")]
        to_artifacts: Option<String>,
        /// Delete everything the target holds first (its models, versions,
        /// rollouts and events; artifacts are kept, they are content-addressed).
        #[arg(long)]
        replace: bool,
    },
}

/// One end of a copy, opened: the store and where its artifacts live.
struct Opened {
    url: StoreUrl,
    store: OpenedStore,
    artifacts: Artifacts,
}

fn open(flag: &str, text: &str, bucket: Option<&str>, source: bool) -> anyhow::Result<Opened> {
    let bucket = bucket
        .map(|b| BucketUrl::parse(b).map_err(|e| anyhow::anyhow!("--{flag}-artifacts: {e}")))
        .transpose()?;
    let url = StoreUrl::parse(text).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))?;
    if let StoreUrl::Sqlite(file) = &url {
        if source && !file.exists() {
            anyhow::bail!(
                "--{flag} {}: there is no Ferry database there; name a data dir (sqlite:./ferry-data) or its ferry.db",
                url.shown()
            );
        }
        if let Some(dir) = url.sqlite_dir() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--{flag}: cannot create {}", dir.display()))?;
        }
    }
    let store = open_store(&url)
        .with_context(|| format!("--{flag} {}", url.shown()))?
        .with_artifacts(bucket.as_ref())
        .with_context(|| format!("--{flag}-artifacts"))?;
    let artifacts = match (&store.shared_blobs, url.sqlite_dir()) {
        (Some(shared), _) => Artifacts::Shared(shared.clone()),
        (None, Some(dir)) => Artifacts::Local(Arc::new(Blobs::open(dir).with_context(|| {
            format!("--{flag}: cannot open the artifacts in {}", dir.display())
        })?)),
        (None, None) => anyhow::bail!("--{flag} {}: no artifacts", url.shown()),
    };
    Ok(Opened {
        url,
        store,
        artifacts,
    })
}

pub async fn run(cmd: StoreCommand, output: Output) -> anyhow::Result<()> {
    let StoreCommand::Copy {
        from,
        to,
        from_artifacts,
        to_artifacts,
        replace,
    } = cmd;
    let (from, to, copied) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let from = open("from", &from, from_artifacts.as_deref(), true)?;
        let to = open("to", &to, to_artifacts.as_deref(), false)?;
        let same = from.url == to.url
            || from.store.store.identity()? == to.store.store.identity()?;
        anyhow::ensure!(
            !same,
            "--from {} and --to {} are the same database (nothing was copied or deleted); name another target",
            from.url.shown(),
            to.url.shown()
        );
        let copied = copy::copy(
            End {
                store: &*from.store.store,
                artifacts: &from.artifacts,
            },
            End {
                store: &*to.store.store,
                artifacts: &to.artifacts,
            },
            replace,
        )
        .map_err(|e| match e {
            copy::CopyError::Store(crate::store::StoreError::NotEmpty { .. }) => anyhow::anyhow!(
                "{e}: --to {} already holds data (pass --replace to delete it first)",
                to.url.shown()
            ),
            e => anyhow::anyhow!("{e}"),
        })?;
        Ok((from.url.shown(), to.url.shown(), copied))
    })
    .await??;
    print(&from, &to, &copied, output);
    Ok(())
}

fn print(from: &str, to: &str, copied: &Copied, output: Output) {
    if output == Output::Json {
        let answer = serde_json::json!({"from": from, "to": to, "copied": copied});
        outln!("{answer:#}");
        return;
    }
    let c = &copied.counts;
    outln!("copied {from} into {to}, and checked the copy:");
    outln!("  models     {:>8}", c.models);
    outln!("  versions   {:>8}", c.versions);
    outln!("  rollouts   {:>8}", c.rollouts);
    outln!("  events     {:>8}", c.events);
    outln!(
        "  artifacts  {:>8}  ({} bytes, every digest checked)",
        copied.artifacts,
        copied.artifact_bytes
    );
}
