//! Opening an export's backing store: a file or block device ([`FileBackend`]), or, with the
//! `rbd` cargo feature, a Ceph RBD image (`aoe_rbd::RbdBackend`) for an `rbd:` path.

use std::sync::Arc;

use anyhow::{Context, Result};
use aoe_store::{AsyncBackend, Backend, Completions, FileBackend, OpenOptions, Pool, PoolBackend};

use crate::config::ExportSpec;

/// How long an `rbd:` export waits for the cluster's monitors at start before it gives up
/// with one line saying so.
pub const CEPH_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// An opened store, before the daemon serves it through the asynchronous interface.
#[derive(Debug)]
pub(crate) enum Opened {
    /// A synchronous store (file, block device): served on the worker pool.
    Sync(Arc<dyn Backend>),
    /// A natively asynchronous store (an RBD image), completing into the queue it was
    /// opened with. (Only RBD images are so far, so without the `rbd` feature none is.)
    #[cfg_attr(not(feature = "rbd"), allow(dead_code))]
    Async(Arc<dyn AsyncBackend>),
}

impl Opened {
    /// The store as the daemon submits to it: a synchronous one on `pool`'s workers.
    pub(crate) fn into_async(self, pool: &Arc<Pool>) -> Arc<dyn AsyncBackend> {
        match self {
            Opened::Sync(b) => Arc::new(PoolBackend::new(b, pool.clone())),
            Opened::Async(b) => b,
        }
    }
}

/// Opens `spec`'s store; returns it and its size in 512-byte sectors. A natively
/// asynchronous store hands its finished requests to `completions`.
pub(crate) fn open(spec: &ExportSpec, completions: &Arc<Completions>) -> Result<(Opened, u64)> {
    if let Some(image) = spec.rbd_image() {
        let image = image?;
        return open_rbd(spec, image, completions);
    }
    let backend = FileBackend::open(
        &spec.path,
        &OpenOptions {
            read_only: spec.read_only,
            direct: spec.direct_io,
            sync: spec.sync,
            offset_sectors: spec.offset,
            length_sectors: spec.length,
        },
    )
    .with_context(|| format!("{}", spec.addr()))?;
    let sectors = backend.sectors();
    Ok((Opened::Sync(Arc::new(backend)), sectors))
}

#[cfg(feature = "rbd")]
fn open_rbd(
    spec: &ExportSpec,
    image: crate::config::RbdImage,
    completions: &Arc<Completions>,
) -> Result<(Opened, u64)> {
    let b = aoe_rbd::RbdBackend::open(
        &aoe_rbd::RbdOptions {
            pool: image.pool,
            namespace: image.namespace,
            image: image.image,
            ceph_conf: spec.ceph.ceph_conf.clone(),
            client_id: spec.ceph.client_id.clone(),
            keyring: spec.ceph.keyring.clone(),
            connect_timeout: CEPH_CONNECT_TIMEOUT,
            read_only: spec.read_only,
        },
        completions.clone(),
    )
    .with_context(|| format!("{}", spec.addr()))?;
    let sectors = b.sectors();
    Ok((Opened::Async(Arc::new(b)), sectors))
}

#[cfg(not(feature = "rbd"))]
fn open_rbd(
    spec: &ExportSpec,
    _: crate::config::RbdImage,
    _: &Arc<Completions>,
) -> Result<(Opened, u64)> {
    anyhow::bail!(
        "{}: {} is a Ceph RBD image, but this aoe was built without the `rbd` feature \
         (cargo build --features aoe-cli/rbd, with librbd-dev installed)",
        spec.addr(),
        spec.path.display()
    )
}

#[cfg(all(test, not(feature = "rbd")))]
mod tests {
    use super::*;
    use crate::config::ServeConfig;

    /// Issue 13: built without the `rbd` feature, an rbd: export is one error naming the
    /// feature, not a file called "rbd:pool/img".
    #[test]
    fn rbd_without_the_feature_names_it() {
        let c = ServeConfig::from_toml(
            "[[export]]\npath = \"rbd:pool/img\"\nshelf = 1\nslot = 1\ninterfaces = [\"x\"]\n",
            std::path::Path::new("/c.toml"),
        )
        .unwrap();
        let e = open(&c.exports[0], &Completions::new(Arc::new(|| {})))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("built without the `rbd` feature"), "{e}");
        assert!(e.starts_with("e1.1: rbd:pool/img"), "{e}");
    }
}
