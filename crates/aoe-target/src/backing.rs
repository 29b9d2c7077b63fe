//! Opening an export's backing store: a file or block device ([`FileBackend`]), or, with the
//! `rbd` cargo feature, a Ceph RBD image (`aoe_rbd::RbdBackend`) for an `rbd:` path.

use std::sync::Arc;

use anyhow::{Context, Result};
use aoe_store::{Backend, FileBackend, OpenOptions};

use crate::config::ExportSpec;

/// How long an `rbd:` export waits for the cluster's monitors at start before it gives up
/// with one line saying so.
pub const CEPH_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens `spec`'s store; returns it and its size in 512-byte sectors.
pub(crate) fn open(spec: &ExportSpec) -> Result<(Arc<dyn Backend>, u64)> {
    if let Some(image) = spec.rbd_image() {
        let image = image?;
        return open_rbd(spec, image);
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
    Ok((Arc::new(backend), sectors))
}

#[cfg(feature = "rbd")]
fn open_rbd(spec: &ExportSpec, image: crate::config::RbdImage) -> Result<(Arc<dyn Backend>, u64)> {
    let b = aoe_rbd::RbdBackend::open(&aoe_rbd::RbdOptions {
        pool: image.pool,
        namespace: image.namespace,
        image: image.image,
        ceph_conf: spec.ceph.ceph_conf.clone(),
        client_id: spec.ceph.client_id.clone(),
        keyring: spec.ceph.keyring.clone(),
        connect_timeout: CEPH_CONNECT_TIMEOUT,
        read_only: spec.read_only,
    })
    .with_context(|| format!("{}", spec.addr()))?;
    let sectors = b.sectors();
    Ok((Arc::new(b), sectors))
}

#[cfg(not(feature = "rbd"))]
fn open_rbd(spec: &ExportSpec, _: crate::config::RbdImage) -> Result<(Arc<dyn Backend>, u64)> {
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
        let e = open(&c.exports[0]).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("built without the `rbd` feature"), "{e}");
        assert!(e.starts_with("e1.1: rbd:pool/img"), "{e}");
    }
}
