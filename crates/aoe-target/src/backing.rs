//! Opening an export's backing store: a file or block device ([`FileBackend`]), or, with the
//! `rbd` cargo feature, a Ceph RBD image (`aoe_rbd::RbdBackend`) for an `rbd:` path.
//!
//! A store several gateways serve at once (an RBD image) also gives the daemon a
//! [`SharedStore`]: a side channel outside the I/O path that the daemon's timer polls (size
//! changes to announce) and that keeps the AoE reservation where every gateway sees it.

use std::io;
use std::sync::Arc;

use anyhow::{Context, Result};
use aoe_store::{AsyncBackend, Backend, Completions, FileBackend, OpenOptions, Pool, PoolBackend};

use crate::config::ExportSpec;
use aoe_wire::MacAddr;

/// How long an `rbd:` export waits for the cluster's monitors at start before it gives up
/// with one line saying so.
pub const CEPH_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a store shared by several gateways (an `rbd:` image, issue 13) tells the daemon and
/// keeps for it, beside the I/O path of [`AsyncBackend`].
pub(crate) trait SharedStore: Send + Sync {
    /// The size in bytes as last seen, without asking the cluster (the daemon's event loop
    /// asks it once a second and announces a change).
    fn size_seen(&self) -> u64;
    /// The AoE reserve list kept in the store (empty: not reserved). May block: asked when
    /// the export opens.
    fn reservation(&self) -> io::Result<Vec<aoe_wire::MacAddr>>;
    /// Stores the reserve list without blocking: `done` is called, from another thread,
    /// with `Ok` once the store has it, or with the error that kept it from storing it.
    fn store_reservation(&self, macs: &[aoe_wire::MacAddr], done: ReserveDone);
    /// The reserve list as the store holds it, if it changed since the last call (another
    /// gateway changed it): no call to the cluster, cheap enough to ask for every frame.
    fn reservation_update(&self) -> Option<Vec<aoe_wire::MacAddr>>;
    /// True once another gateway took the store over (an RBD image: it broke our exclusive
    /// lock). The daemon then stops answering for the export ([`crate::daemon`]'s
    /// dispatch), so initiators re-send to the gateway that took over. No cluster call.
    fn handed_over(&self) -> bool;
    /// True if this gateway took the store over from another one when it opened it (an RBD
    /// image: it broke another client's lock). That gateway falls silent within seconds,
    /// so the duplicate-address probe waits for it ([`TAKEOVER_WAIT`]) instead of refusing.
    fn took_over(&self) -> bool;
}

/// How long a gateway that took its store over from another one keeps probing for that
/// gateway's answers before it gives up as on any duplicate address: the other gateway
/// notices that its lock was broken at its next watch ping (librbd's, every few seconds)
/// or at its first write, and stops answering then.
pub(crate) const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Told the outcome of [`SharedStore::store_reservation`].
pub(crate) type ReserveDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// An opened store's I/O path, before the daemon serves it through the asynchronous
/// interface.
#[derive(Debug)]
pub(crate) enum Store {
    /// A synchronous store (file, block device): served on the worker pool.
    Sync(Arc<dyn Backend>),
    /// A natively asynchronous store (an RBD image), completing into the queue it was
    /// opened with. (Only RBD images are so far, so without the `rbd` feature none is.)
    #[cfg_attr(not(feature = "rbd"), allow(dead_code))]
    Async(Arc<dyn AsyncBackend>),
}

impl Store {
    /// The store as the daemon submits to it: a synchronous one on `pool`'s workers.
    pub(crate) fn into_async(self, pool: &Arc<Pool>) -> Arc<dyn AsyncBackend> {
        match self {
            Store::Sync(b) => Arc::new(PoolBackend::new(b, pool.clone())),
            Store::Async(b) => b,
        }
    }
}

/// An opened store: its I/O path, its size in 512-byte sectors, and its side channel if it
/// is shared by several gateways (an RBD image is both the asynchronous backend and the
/// side channel: one object, two views).
pub(crate) struct Opened {
    pub backend: Store,
    pub sectors: u64,
    pub shared: Option<Arc<dyn SharedStore>>,
}

/// Opens `spec`'s store. A natively asynchronous store hands its finished requests to
/// `completions`.
pub(crate) fn open(spec: &ExportSpec, completions: &Arc<Completions>) -> Result<Opened> {
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
    warn_unaligned_edges(spec, &backend);
    let sectors = backend.sectors();
    Ok(Opened {
        backend: Store::Sync(Arc::new(backend)),
        sectors,
        shared: None,
    })
}

/// Says, once per opening of the export (a start, a reload that opens it, `--check`), that
/// its `-o`/`-l` window starts or ends inside an aligned block of the file (the file's
/// `STATX_DIOALIGN` or logical block size, 4096 when the kernel does not say) that the rest
/// of the file shares. A direct write there is read-modify-written, a whole block at a time;
/// the edge lock (`aoe_store::FileBackend`, twelfth audit) orders that within `aoe serve` and
/// between `aoe serve` processes, but vblade or any other program writing the file takes no
/// such lock, and the twelfth audit lost acknowledged writes with vblade at such an edge.
/// Said, not refused: vblade's users run such windows, and alone they are safe.
fn warn_unaligned_edges(spec: &ExportSpec, backend: &FileBackend) {
    let Some(edges) = backend.unaligned_edges() else {
        return;
    };
    let block_sectors = edges.block / 512;
    let at = |byte: u64, key: &str| {
        let first = byte / edges.block * block_sectors;
        format!(
            "its {key} at sector {} is inside the {}-byte block of sectors {first}-{}",
            byte / 512,
            edges.block,
            first + block_sectors - 1
        )
    };
    let said: Vec<String> = [
        edges.start.map(|b| at(b, "start (-o, offset)")),
        edges.end.map(|b| at(b, "end (-o + -l, offset + length)")),
    ]
    .into_iter()
    .flatten()
    .collect();
    // Fourteenth audit: a partition and its disk are two nodes with two page caches;
    // fifteenth: a buffered export writes its edge blocks through (FileBackend).
    let caches = if edges.other_page_cache {
        "; and this buffered export's device is a partition or a disk with partitions, whose \
         other node has a page cache of its own: its writes at such a block are written \
         through (written back and dropped from this node's page cache under the lock, one \
         write-back each), so another aoe serve process's export of those sectors through \
         the other node does not undo them; -d (direct_io) saves the write-backs"
    } else {
        ""
    };
    tracing::warn!(
        "{}: {} of {}: aoe serve processes lock such a block while they write it, but vblade or \
         any other program writing those sectors does not, and can undo this export's \
         acknowledged writes there (or this export theirs); keep -o and -l (offset, length) \
         multiples of {block_sectors} sectors{caches}",
        spec.addr(),
        said.join(", and "),
        spec.path.display()
    );
}

#[cfg(feature = "rbd")]
impl SharedStore for aoe_rbd::RbdBackend {
    fn size_seen(&self) -> u64 {
        aoe_rbd::RbdBackend::size_seen(self)
    }

    fn reservation(&self) -> io::Result<Vec<aoe_wire::MacAddr>> {
        image_reservation(
            self.name(),
            aoe_rbd::RESERVE_KEY,
            aoe_rbd::RbdBackend::reservation(self)?,
        )
    }

    fn store_reservation(&self, macs: &[aoe_wire::MacAddr], done: ReserveDone) {
        let raw: Vec<[u8; 6]> = macs.iter().map(|m| m.0).collect();
        aoe_rbd::RbdBackend::store_reservation(self, &raw, done)
    }

    fn handed_over(&self) -> bool {
        self.lock_lost()
    }

    fn took_over(&self) -> bool {
        aoe_rbd::RbdBackend::took_over(self)
    }

    /// A list of group MACs only (set with `rbd image-meta set` or by an earlier version)
    /// is logged and not taken, as aoe-rbd does with a value that is not a MAC list: the
    /// gateway keeps enforcing what it had.
    fn reservation_update(&self) -> Option<Vec<aoe_wire::MacAddr>> {
        let raw = aoe_rbd::RbdBackend::reservation_update(self)?;
        match image_reservation(self.name(), aoe_rbd::RESERVE_KEY, raw) {
            Ok(list) => Some(list),
            Err(e) => {
                tracing::warn!(error = %e, "reservation not taken");
                None
            }
        }
    }
}

/// The reserve list kept in an RBD image's metadata (`key` of `image`, `rbd:POOL/IMAGE`)
/// as the engine enforces it: group MACs dropped with a warning, a list of group MACs only
/// refused, by the same rule as the state file's ([`crate::state::drop_group_macs`]). The
/// image outlives every gateway: a group MAC stored before the wire refused Reserve of one
/// (AoE error 2), or set by hand, is still there.
#[cfg_attr(not(any(test, feature = "rbd")), allow(dead_code))]
fn image_reservation(image: &str, key: &str, raw: Vec<[u8; 6]>) -> io::Result<Vec<MacAddr>> {
    let spec = image.strip_prefix("rbd:").unwrap_or(image);
    crate::state::drop_group_macs(
        &format!("image {spec} metadata {key}"),
        "reserve",
        &format!(
            "set it to unicast MACs (rbd image-meta set {spec} {key} MAC,...) or remove it \
             (rbd image-meta remove {spec} {key}) to release the reservation"
        ),
        raw.into_iter().map(MacAddr).collect(),
    )
}

#[cfg(feature = "rbd")]
fn open_rbd(
    spec: &ExportSpec,
    image: crate::config::RbdImage,
    completions: &Arc<Completions>,
) -> Result<Opened> {
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
            buffer_count: spec.buffer_count,
        },
        completions.clone(),
    )
    .with_context(|| format!("{}", spec.addr()))?;
    let sectors = b.sectors();
    let b = Arc::new(b);
    Ok(Opened {
        backend: Store::Async(b.clone()),
        sectors,
        shared: Some(b),
    })
}

#[cfg(not(feature = "rbd"))]
fn open_rbd(spec: &ExportSpec, _: crate::config::RbdImage, _: &Arc<Completions>) -> Result<Opened> {
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

#[cfg(test)]
mod reservation_tests {
    use super::*;

    /// Issue 13 with the s7 audit: the reservation kept in an RBD image follows the state
    /// file's rule. A group MAC (stored before the wire refused it, or set by hand) is
    /// dropped beside unicast ones; a list of group MACs only refuses the start (it
    /// reserved the export for nobody; dropping it would open it to everyone), naming the
    /// image and the `rbd` commands that repair it.
    #[test]
    fn group_macs_in_the_image_reservation_are_dropped_never_widening_access() {
        let good = [2, 0, 0, 0, 0, 1];
        let r = image_reservation("rbd:rbd/img", "aoe.reserve", vec![[0xff; 6], good]);
        assert_eq!(r.unwrap(), vec![MacAddr(good)]);
        assert_eq!(
            image_reservation("rbd:rbd/img", "aoe.reserve", vec![good]).unwrap(),
            vec![MacAddr(good)]
        );
        assert!(image_reservation("rbd:rbd/img", "aoe.reserve", vec![])
            .unwrap()
            .is_empty());
        let e = image_reservation(
            "rbd:rbd/img",
            "aoe.reserve",
            vec![[0x01, 0, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]],
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let e = e.to_string();
        assert!(
            e.starts_with("image rbd/img metadata aoe.reserve: reserve holds only group MACs")
                && e.contains("01:00:5e:00:00:01, 33:33:00:00:00:01")
                && e.contains("rbd image-meta remove rbd/img aoe.reserve")
                && !e.contains('\n'),
            "{e}"
        );
    }
}
