//! # aoe-rbd-sys: librados and librbd, declared by hand, wrapped safely
//!
//! Layer: beside `aoe-sys`, the second (and only other) crate with `unsafe`: the few C
//! functions of Ceph's `rados/librados.h` and `rbd/librbd.h` (Debian's librbd-dev, Ceph 16
//! "pacific" and later) that an AoE export of an RBD image needs, declared in [`ffi`] from the
//! headers, and safe types over them: [`Cluster`] (a connected `rados_t`), [`IoCtx`] (a pool,
//! optionally a namespace), [`Image`] (an open image: size, asynchronous read, vectored read
//! (`rbd_aio_readv`, [`Image::aio_readv`]), write, flush and write-zeroes, the exclusive
//! lock, librbd's options as the image has them).
//!
//! The crates.io librbd bindings are stale, and bindgen would need libclang at build time
//! for about twenty functions, so they are written by hand; each signature is the header's.
//!
//! Asynchronous I/O: each operation is submitted with `rbd_aio_*` and a completion, and the
//! calling thread waits on that completion before it returns, so the buffer the caller lent
//! outlives the operation without any callback or shared ownership. Requests are in flight
//! at once across threads (the store's worker pool): librbd images are safe to use from
//! several threads, and its `rbd_aio_*` calls were made for exactly that.
//!
//! Errors: librados and librbd return `-errno`; they come back as [`std::io::Error`]s with
//! that errno, so `ENOENT` (no such image), `EACCES`/`EPERM` (cephx refused), `ETIMEDOUT`
//! (no monitor within `client_mount_timeout`), `EROFS` (the exclusive lock is another
//! client's) and `ESHUTDOWN` (this client was blocklisted) stay distinguishable.
#![warn(missing_docs)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::raw::{c_char, c_int};
use std::sync::Arc;

/// The C declarations, as in Ceph 16's headers.
#[allow(non_camel_case_types, missing_docs)]
pub mod ffi {
    use std::os::raw::{c_char, c_int, c_void};

    pub type rados_t = *mut c_void;
    pub type rados_ioctx_t = *mut c_void;
    pub type rbd_image_t = *mut c_void;
    pub type rbd_completion_t = *mut c_void;
    pub type rbd_callback_t = Option<unsafe extern "C" fn(cb: rbd_completion_t, arg: *mut c_void)>;
    /// `rbd_lock_mode_t` (an enum, an `int` in the C ABI).
    pub type rbd_lock_mode_t = c_int;
    pub const RBD_LOCK_MODE_EXCLUSIVE: rbd_lock_mode_t = 0;
    /// `RBD_FEATURE_EXCLUSIVE_LOCK` of `rbd/features.h`.
    pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;

    extern "C" {
        // rados/librados.h
        pub fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
        pub fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
        pub fn rados_conf_set(
            cluster: rados_t,
            option: *const c_char,
            value: *const c_char,
        ) -> c_int;
        pub fn rados_connect(cluster: rados_t) -> c_int;
        pub fn rados_shutdown(cluster: rados_t);
        pub fn rados_ioctx_create(
            cluster: rados_t,
            pool_name: *const c_char,
            ioctx: *mut rados_ioctx_t,
        ) -> c_int;
        pub fn rados_ioctx_destroy(io: rados_ioctx_t);
        pub fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);

        // rbd/librbd.h
        pub fn rbd_open(
            io: rados_ioctx_t,
            name: *const c_char,
            image: *mut rbd_image_t,
            snap_name: *const c_char,
        ) -> c_int;
        pub fn rbd_close(image: rbd_image_t) -> c_int;
        pub fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
        pub fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
        pub fn rbd_aio_create_completion(
            cb_arg: *mut c_void,
            complete_cb: rbd_callback_t,
            c: *mut rbd_completion_t,
        ) -> c_int;
        pub fn rbd_aio_read(
            image: rbd_image_t,
            off: u64,
            len: usize,
            buf: *mut c_char,
            c: rbd_completion_t,
        ) -> c_int;
        pub fn rbd_aio_write(
            image: rbd_image_t,
            off: u64,
            len: usize,
            buf: *const c_char,
            c: rbd_completion_t,
        ) -> c_int;
        pub fn rbd_aio_write_zeroes(
            image: rbd_image_t,
            off: u64,
            len: usize,
            c: rbd_completion_t,
            zero_flags: c_int,
            op_flags: c_int,
        ) -> c_int;
        pub fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
        pub fn rbd_aio_readv(
            image: rbd_image_t,
            iov: *const libc::iovec,
            iovcnt: c_int,
            off: u64,
            c: rbd_completion_t,
        ) -> c_int;
        pub fn rbd_aio_wait_for_complete(c: rbd_completion_t) -> c_int;
        pub fn rbd_aio_get_return_value(c: rbd_completion_t) -> isize;
        pub fn rbd_aio_release(c: rbd_completion_t);
        pub fn rbd_is_exclusive_lock_owner(image: rbd_image_t, is_owner: *mut c_int) -> c_int;
        pub fn rbd_lock_acquire(image: rbd_image_t, lock_mode: rbd_lock_mode_t) -> c_int;
        pub fn rbd_lock_get_owners(
            image: rbd_image_t,
            lock_mode: *mut rbd_lock_mode_t,
            lock_owners: *mut *mut c_char,
            max_lock_owners: *mut usize,
        ) -> c_int;
        pub fn rbd_lock_get_owners_cleanup(lock_owners: *mut *mut c_char, lock_owner_count: usize);
        pub fn rbd_lock_break(
            image: rbd_image_t,
            lock_mode: rbd_lock_mode_t,
            lock_owner: *const c_char,
        ) -> c_int;
    }

    // Watching the image and keeping state in it (issue 13: fencing noticed at once, resize
    // announced, reservations shared by gateways). A block of its own, apart from the aio
    // declarations above.
    /// `rbd_update_callback_t`: called from a librbd thread when the image's header changes.
    pub type rbd_update_callback_t = Option<unsafe extern "C" fn(arg: *mut c_void)>;

    extern "C" {
        // rados/librados.h
        pub fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
        pub fn rados_buffer_free(buf: *mut c_char);
        pub fn rados_blocklist_add(
            cluster: rados_t,
            client_address: *mut c_char,
            expire_seconds: u32,
        ) -> c_int;

        // rbd/librbd.h
        pub fn rbd_update_watch(
            image: rbd_image_t,
            handle: *mut u64,
            watch_cb: rbd_update_callback_t,
            arg: *mut c_void,
        ) -> c_int;
        pub fn rbd_update_unwatch(image: rbd_image_t, handle: u64) -> c_int;
        pub fn rbd_metadata_get(
            image: rbd_image_t,
            key: *const c_char,
            value: *mut c_char,
            val_len: *mut usize,
        ) -> c_int;
        pub fn rbd_metadata_set(
            image: rbd_image_t,
            key: *const c_char,
            value: *const c_char,
        ) -> c_int;
        pub fn rbd_metadata_remove(image: rbd_image_t, key: *const c_char) -> c_int;
        pub fn rbd_config_image_list(
            image: rbd_image_t,
            options: *mut rbd_config_option_t,
            max_options: *mut c_int,
        ) -> c_int;
        pub fn rbd_config_image_list_cleanup(options: *mut rbd_config_option_t, max_options: c_int);
        pub fn rbd_config_pool_list(
            io: rados_ioctx_t,
            options: *mut rbd_config_option_t,
            max_options: *mut c_int,
        ) -> c_int;
        pub fn rbd_config_pool_list_cleanup(options: *mut rbd_config_option_t, max_options: c_int);
    }

    /// `rbd_config_option_t`: one librbd option as an open image has it.
    #[repr(C)]
    pub struct rbd_config_option_t {
        pub name: *mut c_char,
        pub value: *mut c_char,
        /// `rbd_config_source_t` (an enum, an `int` in the C ABI): 0 the client's config,
        /// 1 the pool's, 2 the image's.
        pub source: c_int,
    }
}

/// A `-errno` return as an error, anything else as its value.
fn check(ret: c_int, what: &str) -> io::Result<c_int> {
    if ret < 0 {
        let e = io::Error::from_raw_os_error(-ret);
        Err(io::Error::new(e.kind(), Errno(what.to_string(), e)))
    } else {
        Ok(ret)
    }
}

/// An error that names the call and keeps the errno (reachable through
/// [`errno`]).
#[derive(Debug)]
struct Errno(String, io::Error);

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.0, self.1)
    }
}

impl std::error::Error for Errno {}

/// The errno of an error returned by this crate (or of a plain OS error), if any.
pub fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|i| i.downcast_ref::<Errno>())
            .and_then(|n| n.1.raw_os_error())
    })
}

/// Calls a librbd option-list function (`rbd_config_image_list`, `rbd_config_pool_list`:
/// `list(options, &mut max)`) with room for more entries until they fit, copies them out
/// and frees librbd's strings with the matching `cleanup`.
fn config_list(
    what: &str,
    mut list: impl FnMut(*mut ffi::rbd_config_option_t, *mut c_int) -> c_int,
    cleanup: unsafe extern "C" fn(*mut ffi::rbd_config_option_t, c_int),
) -> io::Result<Vec<ConfigOption>> {
    let mut cap: c_int = 256;
    loop {
        let mut opts: Vec<ffi::rbd_config_option_t> = (0..cap)
            .map(|_| ffi::rbd_config_option_t {
                name: std::ptr::null_mut(),
                value: std::ptr::null_mut(),
                source: 0,
            })
            .collect();
        let mut n = cap;
        let r = list(opts.as_mut_ptr(), &mut n);
        if r == -libc::ERANGE && n > cap && n <= 1 << 16 {
            cap = n;
            continue;
        }
        check(r, what)?;
        let n = n.clamp(0, cap);
        let text = |p: *mut c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: librbd set it to a NUL-terminated string it allocated, freed only
                // by the cleanup below.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        let options = opts[..n as usize]
            .iter()
            .map(|o| ConfigOption {
                name: text(o.name),
                value: text(o.value),
                source: match o.source {
                    1 => ConfigSource::Pool,
                    2 => ConfigSource::Image,
                    _ => ConfigSource::Client,
                },
            })
            .collect();
        // SAFETY: the `n` entries librbd filled, freed once with the cleanup function that
        // goes with the list function that filled them.
        unsafe { cleanup(opts.as_mut_ptr(), n) };
        return Ok(options);
    }
}

/// A string for C: one with a NUL inside cannot be named to Ceph.
fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{s:?} contains a NUL byte"),
        )
    })
}

/// Where an open image's librbd option got its value ([`Image::config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    /// The client's config: defaults, the config file, `rados_conf_set`, the monitors'.
    Client,
    /// The pool's override (`rbd config pool set`).
    Pool,
    /// The image's override (`rbd config image set`).
    Image,
}

/// One librbd option of an open image ([`Image::config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigOption {
    /// Its name, e.g. `rbd_cache`.
    pub name: String,
    /// Its value as text, e.g. `true`.
    pub value: String,
    /// Where the value came from.
    pub source: ConfigSource,
}

/// A connected cluster handle (`rados_t`), shut down on drop.
#[derive(Debug)]
pub struct Cluster {
    raw: ffi::rados_t,
}

// SAFETY: a connected rados_t is documented thread-safe (librados.h: "all functions are
// thread-safe" for a cluster handle once connected); the pointer is only freed in Drop.
unsafe impl Send for Cluster {}
// SAFETY: as above; every method takes &self and librados serialises internally.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Creates a handle for client `id` (the part after `client.`; `None`: `admin`), reads
    /// `conf` (`None`: librados's default search, `$CEPH_CONF` then /etc/ceph/ceph.conf),
    /// applies `options` (`rados_conf_set` name/value pairs, e.g. `keyring`), and connects.
    pub fn connect(
        id: Option<&str>,
        conf: Option<&std::path::Path>,
        options: &[(&str, &str)],
    ) -> io::Result<Cluster> {
        let id = id.map(cstr).transpose()?;
        let mut raw: ffi::rados_t = std::ptr::null_mut();
        check(
            // SAFETY: `raw` is a valid out-pointer; `id` is NUL-terminated or null (default id),
            // and librados copies it.
            unsafe {
                ffi::rados_create(
                    &mut raw,
                    id.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                )
            },
            "rados_create",
        )?;
        // From here Drop shuts the handle down, connected or not (rados_shutdown accepts a
        // handle that never connected).
        let cluster = Cluster { raw };
        let path = match conf {
            Some(p) => Some(cstr(p.to_str().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "ceph config path is not UTF-8")
            })?)?),
            None => None,
        };
        check(
            // SAFETY: `cluster.raw` is a live handle; the path is NUL-terminated or null (null
            // searches the default locations).
            unsafe {
                ffi::rados_conf_read_file(
                    cluster.raw,
                    path.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                )
            },
            &match conf {
                Some(p) => format!("cannot read the ceph config {}", p.display()),
                // librados's search (common/config.cc, CEPH_CONF_FILE_DEFAULT).
                None => "cannot read the ceph config (none given: looked for $CEPH_CONF, \
                         /etc/ceph/ceph.conf, ~/.ceph/ceph.conf, ./ceph.conf)"
                    .to_string(),
            },
        )?;
        for (k, v) in options {
            let (ck, cv) = (cstr(k)?, cstr(v)?);
            check(
                // SAFETY: live handle, both strings NUL-terminated and copied by librados.
                unsafe { ffi::rados_conf_set(cluster.raw, ck.as_ptr(), cv.as_ptr()) },
                &format!("ceph option {k}"),
            )?;
        }
        check(
            // SAFETY: live, configured, not yet connected handle.
            unsafe { ffi::rados_connect(cluster.raw) },
            "cannot connect to the cluster",
        )?;
        Ok(cluster)
    }

    /// Opens pool `pool`, in `namespace` if given.
    pub fn ioctx(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> io::Result<IoCtx> {
        let cpool = cstr(pool)?;
        let mut raw: ffi::rados_ioctx_t = std::ptr::null_mut();
        check(
            // SAFETY: live connected handle, NUL-terminated name, valid out-pointer.
            unsafe { ffi::rados_ioctx_create(self.raw, cpool.as_ptr(), &mut raw) },
            &format!("pool {pool}"),
        )?;
        let io = IoCtx {
            raw,
            _cluster: self.clone(),
        };
        if let Some(ns) = namespace {
            let cns = cstr(ns)?;
            // SAFETY: `io.raw` was just created; the namespace string is copied.
            unsafe { ffi::rados_ioctx_set_namespace(io.raw, cns.as_ptr()) };
        }
        Ok(io)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle is ours and every IoCtx (which holds an Arc of us) is gone.
        unsafe { ffi::rados_shutdown(self.raw) }
    }
}

/// A pool (and namespace) of a cluster: `rados_ioctx_t`.
#[derive(Debug)]
pub struct IoCtx {
    raw: ffi::rados_ioctx_t,
    _cluster: Arc<Cluster>,
}

// SAFETY: an ioctx may be shared between threads for I/O (librados.h); it is only
// reconfigured (set_namespace) before it is shared, and freed in Drop.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// librbd's options as the pool has them (`rbd config pool list`): the client's config
    /// with the pool's overrides (`rbd config pool set`) over it. Needs no open image, so it
    /// answers for an image that librbd cannot open.
    pub fn config(&self) -> io::Result<Vec<ConfigOption>> {
        config_list(
            "rbd_config_pool_list",
            |opts, n| {
                // SAFETY: live ioctx; `opts` has `*n` writable entries, and librbd fills at
                // most `*n` (else ERANGE with `*n` set to the number needed, nothing filled).
                unsafe { ffi::rbd_config_pool_list(self.raw, opts, n) }
            },
            ffi::rbd_config_pool_list_cleanup,
        )
    }

    /// Opens image `name` (its head, not a snapshot).
    pub fn open(self: &Arc<Self>, name: &str) -> io::Result<Image> {
        let cname = cstr(name)?;
        let mut raw: ffi::rbd_image_t = std::ptr::null_mut();
        check(
            // SAFETY: live ioctx, NUL-terminated name, valid out-pointer, null snapshot (head).
            unsafe { ffi::rbd_open(self.raw, cname.as_ptr(), &mut raw, std::ptr::null()) },
            &format!("image {name}"),
        )?;
        Ok(Image {
            raw,
            _io: self.clone(),
            in_flight: Arc::new(InFlight::default()),
            watch: std::sync::Mutex::new(None),
        })
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: ours, and every Image (which holds an Arc of us) is gone.
        unsafe { ffi::rados_ioctx_destroy(self.raw) }
    }
}

/// An open RBD image: `rbd_image_t`.
#[derive(Debug)]
pub struct Image {
    raw: ffi::rbd_image_t,
    _io: Arc<IoCtx>,
    /// Operations started with [`Image::aio_submit`] whose callback has not finished.
    in_flight: Arc<InFlight>,
    /// The update watch of [`Image::watch_updates`], if any: librbd's handle and the
    /// callback it was given, unregistered and freed in Drop before the image is closed.
    watch: std::sync::Mutex<Option<UpdateWatch>>,
}

/// What an update watch keeps alive: librbd's handle and the boxed callback whose address
/// librbd holds as the watch's argument.
struct UpdateWatch {
    handle: u64,
    callback: *mut Callback,
}

/// An update callback, boxed once more so that librbd gets a thin pointer.
type Callback = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for UpdateWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UpdateWatch({})", self.handle)
    }
}

/// The C side of an update watch: librbd calls it from one of its threads with the
/// argument given to `rbd_update_watch`.
unsafe extern "C" fn on_update(arg: *mut std::os::raw::c_void) {
    // SAFETY: `arg` is the `*mut Callback` registered in Image::watch_updates, freed only in
    // Image's Drop after rbd_update_unwatch, which waits for callbacks under way.
    let f = unsafe { &*(arg as *const Callback) };
    // A panic must not unwind into C: it is caught and dropped (the callback only wakes a
    // thread, so there is nothing to recover).
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
}

// SAFETY: librbd's image handle is internally locked and its aio calls are meant to be
// issued from many threads at once; it is only freed in Drop (which has &mut self).
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

/// One asynchronous operation's completion, released on drop.
struct Completion(ffi::rbd_completion_t);

impl Completion {
    fn new() -> io::Result<Completion> {
        let mut c: ffi::rbd_completion_t = std::ptr::null_mut();
        check(
            // SAFETY: no callback (we wait instead), so the argument is never used; valid
            // out-pointer.
            unsafe { ffi::rbd_aio_create_completion(std::ptr::null_mut(), None, &mut c) },
            "rbd_aio_create_completion",
        )?;
        Ok(Completion(c))
    }

    /// Waits for the operation and returns its result (bytes, or `-errno`).
    fn wait(&self) -> isize {
        // SAFETY: a live completion whose operation was submitted.
        unsafe { ffi::rbd_aio_wait_for_complete(self.0) };
        // SAFETY: as above; the operation is complete.
        unsafe { ffi::rbd_aio_get_return_value(self.0) }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // SAFETY: ours; never submitted, or waited for (every submit path waits before the
        // Completion goes out of scope), so librbd no longer refers to it.
        unsafe { ffi::rbd_aio_release(self.0) }
    }
}

/// Submits with `submit(completion)` and, if librbd took it, waits for it. The borrowed
/// buffers of the caller stay borrowed until this returns, i.e. until librbd is done. Errors
/// are the bare errno (`what` names the operation for readers of this code only).
fn run_aio(_what: &str, submit: impl FnOnce(ffi::rbd_completion_t) -> c_int) -> io::Result<usize> {
    let c = Completion::new()?;
    let r = submit(c.0);
    let r = if r < 0 { r as isize } else { c.wait() };
    if r < 0 {
        // A plain OS error, so the store's mapping (EIO: medium error) sees the errno.
        return Err(io::Error::from_raw_os_error(-(r as i32)));
    }
    Ok(r as usize)
}

impl Image {
    /// The image's size in bytes now (librbd refreshes it when the image is resized).
    pub fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        check(
            // SAFETY: live image, valid out-pointer.
            unsafe { ffi::rbd_get_size(self.raw, &mut size) },
            "rbd_get_size",
        )?;
        Ok(size)
    }

    /// True if the image has the exclusive-lock feature.
    pub fn has_exclusive_lock(&self) -> io::Result<bool> {
        let mut f = 0u64;
        check(
            // SAFETY: live image, valid out-pointer.
            unsafe { ffi::rbd_get_features(self.raw, &mut f) },
            "rbd_get_features",
        )?;
        Ok(f & ffi::RBD_FEATURE_EXCLUSIVE_LOCK != 0)
    }

    /// Reads `buf.len()` bytes at `offset` with `rbd_aio_read`, waiting for the completion.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let (ptr, len) = (buf.as_mut_ptr().cast::<c_char>(), buf.len());
        let n = run_aio("rbd read", |c| {
            // SAFETY: `buf` is `len` writable bytes, mutably borrowed until run_aio has
            // waited for the completion; live image and completion.
            unsafe { ffi::rbd_aio_read(self.raw, offset, len, ptr, c) }
        })?;
        if n != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("rbd read at {offset}: {n} of {len} bytes"),
            ));
        }
        Ok(())
    }

    /// Writes `buf` at `offset` with `rbd_aio_write`, waiting for the completion.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (ptr, len) = (buf.as_ptr().cast::<c_char>(), buf.len());
        run_aio("rbd write", |c| {
            // SAFETY: `buf` is `len` readable bytes borrowed until run_aio has waited for
            // the completion; librbd only reads it.
            unsafe { ffi::rbd_aio_write(self.raw, offset, len, ptr, c) }
        })?;
        Ok(())
    }

    /// Zeroes `len` bytes at `offset` with `rbd_aio_write_zeroes`.
    pub fn write_zeroes(&self, offset: u64, len: usize) -> io::Result<()> {
        run_aio("rbd write-zeroes", |c| {
            // SAFETY: live image and completion; no buffer; flags 0 (plain zeroing).
            unsafe { ffi::rbd_aio_write_zeroes(self.raw, offset, len, c, 0, 0) }
        })?;
        Ok(())
    }

    /// Makes every acknowledged write durable with `rbd_aio_flush` (it drains librbd's
    /// write-back cache, when one is on, to the OSDs).
    pub fn flush(&self) -> io::Result<()> {
        run_aio("rbd flush", |c| {
            // SAFETY: live image and completion.
            unsafe { ffi::rbd_aio_flush(self.raw, c) }
        })?;
        Ok(())
    }

    /// Takes the exclusive lock and keeps it: librbd then no longer hands it to a peer that
    /// asks (`rbd_lock_acquire` turns the automatic transitions off), so it stays ours until
    /// we close the image or someone breaks it. `EROFS`/`EBUSY` if a live peer holds it.
    pub fn lock_acquire(&self) -> io::Result<()> {
        check(
            // SAFETY: live image.
            unsafe { ffi::rbd_lock_acquire(self.raw, ffi::RBD_LOCK_MODE_EXCLUSIVE) },
            "cannot take the exclusive lock",
        )?;
        Ok(())
    }

    /// True while this handle owns the exclusive lock.
    pub fn is_lock_owner(&self) -> io::Result<bool> {
        let mut owner: c_int = 0;
        check(
            // SAFETY: live image, valid out-pointer.
            unsafe { ffi::rbd_is_exclusive_lock_owner(self.raw, &mut owner) },
            "rbd_is_exclusive_lock_owner",
        )?;
        Ok(owner != 0)
    }

    /// The clients holding the image's lock (as `client.N` addresses), empty if none.
    pub fn lock_owners(&self) -> io::Result<Vec<String>> {
        const MAX: usize = 16;
        let mut owners: [*mut c_char; MAX] = [std::ptr::null_mut(); MAX];
        let mut n = MAX;
        let mut mode: ffi::rbd_lock_mode_t = 0;
        let r =
            // SAFETY: `owners` has room for `n` pointers; librbd fills at most `n` and updates it.
            unsafe { ffi::rbd_lock_get_owners(self.raw, &mut mode, owners.as_mut_ptr(), &mut n) };
        if r == -libc::ENOENT {
            return Ok(Vec::new()); // nobody holds it
        }
        check(r, "rbd_lock_get_owners")?;
        let n = n.min(MAX);
        let v = owners[..n]
            .iter()
            .map(|&p| {
                // SAFETY: librbd set the first `n` entries to NUL-terminated strings that live
                // until the cleanup call below.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            })
            .collect();
        // SAFETY: the `n` strings librbd allocated above, freed once.
        unsafe { ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
        Ok(v)
    }

    /// Breaks `owner`'s exclusive lock; librbd blocklists the owner first (Ceph's
    /// `rbd_blocklist_on_break_lock`, on by default), so its writes can no longer land.
    pub fn lock_break(&self, owner: &str) -> io::Result<()> {
        let co = cstr(owner)?;
        check(
            // SAFETY: live image, NUL-terminated owner string.
            unsafe { ffi::rbd_lock_break(self.raw, ffi::RBD_LOCK_MODE_EXCLUSIVE, co.as_ptr()) },
            &format!("cannot break {owner}'s lock"),
        )?;
        Ok(())
    }
}

// Watching the image and keeping state in it (issue 13). A block apart from the I/O
// methods above.
impl Image {
    /// Calls `f` (from a librbd thread) whenever the image's header changes: a resize, a
    /// metadata change, a lock taken or released, and after librbd re-established its watch
    /// on the header (as after this client was blocklisted): `rbd_update_watch`. `f` should
    /// only note the event and wake someone; it must not call back into this image, nor own
    /// it (the image's Drop unregisters the watch and waits for its callbacks). One
    /// watch per image: a second call replaces nothing and fails with `EEXIST`.
    pub fn watch_updates(&self, f: Box<dyn Fn() + Send + Sync>) -> io::Result<()> {
        let mut slot = self
            .watch
            .lock()
            .map_err(|_| io::Error::other("update watch lock poisoned"))?;
        if slot.is_some() {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        let callback: *mut Callback = Box::into_raw(Box::new(f));
        let mut handle = 0u64;
        let r = check(
            // SAFETY: live image, valid out-pointer; `callback` stays allocated until Drop
            // has unregistered the watch (or just below, if registering fails).
            unsafe {
                ffi::rbd_update_watch(self.raw, &mut handle, Some(on_update), callback.cast())
            },
            "rbd_update_watch",
        );
        if let Err(e) = r {
            // SAFETY: librbd refused the watch, so it holds no copy of the pointer; ours, freed
            // once.
            drop(unsafe { Box::from_raw(callback) });
            return Err(e);
        }
        *slot = Some(UpdateWatch { handle, callback });
        Ok(())
    }

    /// The addresses of this client's RADOS session (`rados_getaddrs`), e.g.
    /// `127.0.0.1:0/3271524781`: what [`Image::lock_owners`] lists for a lock this client holds.
    pub fn client_addrs(&self) -> io::Result<String> {
        let mut p: *mut c_char = std::ptr::null_mut();
        check(
            // SAFETY: live connected cluster handle (the image holds it), valid out-pointer.
            unsafe { ffi::rados_getaddrs(self._io._cluster.raw, &mut p) },
            "rados_getaddrs",
        )?;
        if p.is_null() {
            return Ok(String::new());
        }
        // SAFETY: librados set `p` to a NUL-terminated string it allocated.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: that buffer, freed once with the function librados names for it.
        unsafe { ffi::rados_buffer_free(p) };
        Ok(s)
    }

    /// Has the monitors blocklist client `addr` (`IP:PORT/NONCE`, as [`Image::lock_owners`]
    /// lists a lock's holder) for their default time (`mon_osd_blocklist_default_expire`, an
    /// hour): `rados_blocklist_add` with an expiry of 0, what `ceph osd blocklist add ADDR`
    /// does. The OSDs then refuse the client's requests (`EBLOCKLISTED`), whatever its
    /// librbd's config says: the fence a lock break relies on, made by the caller rather than
    /// by librbd's `rbd_blocklist_on_break_lock`, which librbd fixes from the image's config
    /// when it opens the image.
    pub fn blocklist(&self, addr: &str) -> io::Result<()> {
        let c = cstr(addr)?;
        check(
            // SAFETY: live connected cluster handle (the image holds it); `c` is a
            // NUL-terminated string that librados only reads (its prototype lacks `const`).
            unsafe {
                ffi::rados_blocklist_add(self._io._cluster.raw, c.as_ptr() as *mut c_char, 0)
            },
            &format!("cannot blocklist {addr}"),
        )
        .map(|_| ())
    }

    /// The image metadata value of `key` (`rbd image-meta get`), `None` if unset.
    pub fn metadata_get(&self, key: &str) -> io::Result<Option<String>> {
        let ckey = cstr(key)?;
        let mut buf = vec![0u8; 256];
        loop {
            let mut len = buf.len();
            let r =
                // SAFETY: live image, NUL-terminated key, `buf` has `len` writable bytes and
                // librbd writes at most `len` (or sets `len` to the size needed: ERANGE).
                unsafe {
                    ffi::rbd_metadata_get(self.raw, ckey.as_ptr(), buf.as_mut_ptr().cast(), &mut len)
                };
            if r == -libc::ENOENT {
                return Ok(None);
            }
            if r == -libc::ERANGE && len > buf.len() && len <= 1 << 20 {
                buf.resize(len, 0);
                continue;
            }
            check(r, "rbd_metadata_get")?;
            let end = buf[..len.min(buf.len())]
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(len.min(buf.len()));
            return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
        }
    }

    /// Sets image metadata `key` to `value` (`rbd image-meta set`); librbd notifies the
    /// image's other watchers, whose [`Image::watch_updates`] callbacks run.
    pub fn metadata_set(&self, key: &str, value: &str) -> io::Result<()> {
        let (ckey, cval) = (cstr(key)?, cstr(value)?);
        check(
            // SAFETY: live image, both strings NUL-terminated and copied by librbd.
            unsafe { ffi::rbd_metadata_set(self.raw, ckey.as_ptr(), cval.as_ptr()) },
            "rbd_metadata_set",
        )?;
        Ok(())
    }

    /// librbd's options as this open image has them (`rbd config image list`): the client's
    /// config (its file and `rados_conf_set`) with the pool's and then the image's overrides
    /// applied over it. Those overrides (`rbd config pool set`, `rbd config image set`, kept
    /// as `conf_` metadata keys) win over whatever the client set (librbd's
    /// `ImageCtx::apply_metadata`), so this is the only way to learn, say, whether librbd
    /// caches this image's writes.
    pub fn config(&self) -> io::Result<Vec<ConfigOption>> {
        config_list(
            "rbd_config_image_list",
            |opts, n| {
                // SAFETY: live image; `opts` has `*n` writable entries, and librbd fills at
                // most `*n` (else ERANGE with `*n` set to the number needed, nothing filled).
                unsafe { ffi::rbd_config_image_list(self.raw, opts, n) }
            },
            ffi::rbd_config_image_list_cleanup,
        )
    }

    /// Removes image metadata `key`; no error if it was not set.
    pub fn metadata_remove(&self, key: &str) -> io::Result<()> {
        let ckey = cstr(key)?;
        // SAFETY: live image, NUL-terminated key.
        let r = unsafe { ffi::rbd_metadata_remove(self.raw, ckey.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(r, "rbd_metadata_remove")?;
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // The order matters: nothing may call back into freed memory, and rbd_close must
        // come last. This must not run on a librbd thread, inside a callback: a callback
        // that owned the image (aio or watch) would wait here for itself. So neither kind
        // may own it (see `AioDone` and `watch_updates`; aoe-rbd's hold only a queue, a
        // fence flag and a wake-up flag).
        // 1. Operations submitted with a callback own their buffers until it has run; wait
        //    for the last one, so librbd never completes into a closed image and no aio
        //    callback outlives what it refers to. No new one can start: Drop has `&mut self`,
        //    so nobody else can call aio_submit. An aio callback does not touch the update
        //    watch (and must not block), so waiting here cannot hold up a watch callback
        //    that librbd runs on the same threads, nor the reverse.
        self.in_flight.wait_idle();
        // 2. The update watch: its callback's box may only be freed once librbd can no
        //    longer call it.
        if let Some(w) = self.watch.get_mut().ok().and_then(Option::take) {
            // SAFETY: live image (not closed until below), the handle librbd gave us.
            // rbd_update_unwatch returns once no callback of this watch runs or will run
            // (it waits for notifications under way), so the callback can be freed after it.
            unsafe { ffi::rbd_update_unwatch(self.raw, w.handle) };
            // SAFETY: the pointer Box::into_raw made in watch_updates, freed once, here, and
            // librbd no longer uses it (unregistered just above).
            drop(unsafe { Box::from_raw(w.callback) });
        }
        // 3. Close.
        // SAFETY: ours; the waiting operations (read_at & co.) were waited for before their
        // call returned and the callback ones in step 1, so none is in flight, and no watch
        // is registered (step 2). The return value (a final flush's error) has nowhere to go.
        unsafe { ffi::rbd_close(self.raw) };
    }
}

// ------------------------------------------------------------------------------------------
// Asynchronous I/O with completion callbacks (many requests in flight, no thread waiting):
// the store interface of aoe-store, for the RBD backend of aoe-rbd.

/// What one asynchronous operation does; the ranges say where in its buffer the data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AioOp {
    /// `rbd_aio_read` of `at.len()` bytes at `offset` into `buf[at]`.
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// Where in the buffer the data goes.
        at: std::ops::Range<usize>,
    },
    /// `rbd_aio_write` of `buf[from]` at `offset`.
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// Where in the buffer the data is.
        from: std::ops::Range<usize>,
    },
    /// `rbd_aio_write_zeroes` of `len` bytes at `offset` (the buffer is unused).
    WriteZeroes {
        /// Byte offset in the image.
        offset: u64,
        /// Bytes to zero.
        len: u64,
    },
    /// `rbd_aio_flush` (the buffer is unused).
    Flush,
}

/// Called once when an operation has completed, on a librbd thread (or on the submitting
/// thread if librbd refused it at once): the operation's buffer back, and librbd's result
/// (bytes transferred, 0, or `-errno`). It must not block: librbd runs every image's
/// completions on a few threads. Nor may it own the [`Image`] (directly or through an
/// `Arc`): dropping the image waits for every callback, so a callback must never be the
/// one that drops it.
pub type AioDone = Box<dyn FnOnce(Vec<u8>, isize) + Send + 'static>;

/// Counts an image's callback operations, so that closing it can wait for them.
#[derive(Debug, Default)]
struct InFlight {
    n: std::sync::Mutex<usize>,
    idle: std::sync::Condvar,
}

impl InFlight {
    fn enter(&self) {
        *self.n.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn leave(&self) {
        let mut n = self.n.lock().unwrap_or_else(|p| p.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    fn count(&self) -> usize {
        *self.n.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the count to reach 0; says so on stderr every 10 s meanwhile (a cluster
    /// that went away holds the operations, and freeing their buffers early would let
    /// librbd write into freed memory, so there is no giving up).
    fn wait_idle(&self) {
        let mut n = self.n.lock().unwrap_or_else(|p| p.into_inner());
        let start = std::time::Instant::now();
        while *n > 0 {
            let (g, t) = self
                .idle
                .wait_timeout(n, std::time::Duration::from_secs(10))
                .unwrap_or_else(|p| p.into_inner());
            n = g;
            if t.timed_out() && *n > 0 {
                eprintln!(
                    "rbd: closing an image waits for {} operation(s) in flight ({} s so far)",
                    *n,
                    start.elapsed().as_secs()
                );
            }
        }
    }
}

/// Called once when a vectored read ([`Image::aio_readv`]) has completed, with the parts'
/// buffers back in the order they were given and librbd's result (bytes read, or
/// `-errno`); the same rules as [`AioDone`].
pub type AioDoneMany = Box<dyn FnOnce(Vec<Vec<u8>>, isize) + Send + 'static>;

/// Most parts of one vectored read: Linux's `IOV_MAX`, the bound `readv(2)` callers keep
/// to, kept here too (a receive batch of 64 frames never comes near it).
pub const MAX_READV_PARTS: usize = 1024;

/// What an operation owns between submit and callback.
enum Owned {
    /// One buffer ([`Image::aio_submit`]).
    One { buf: Vec<u8>, done: AioDone },
    /// Several ([`Image::aio_readv`]), and the iovec array librbd scatters into: built once
    /// the buffers sit in the box, never grown afterwards, so its heap array (whose address
    /// librbd keeps) and the buffers it points into stay put until the callback.
    Many {
        bufs: Vec<Vec<u8>>,
        iov: Vec<libc::iovec>,
        done: AioDoneMany,
    },
}

/// One operation between submit and callback: owns the buffers librbd reads or writes.
struct Pending {
    owned: Owned,
    in_flight: Arc<InFlight>,
}

impl Pending {
    /// Hands the buffers and result to the caller's callback and leaves the count. A panic
    /// in the callback is stopped here: it must not unwind into librbd's C++ frames.
    fn finish(self, result: isize) {
        let Pending { owned, in_flight } = self;
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || match owned {
            Owned::One { buf, done } => done(buf, result),
            Owned::Many { bufs, iov, done } => {
                drop(iov);
                done(bufs, result)
            }
        }));
        in_flight.leave();
    }
}

/// A completion that hands `arg` to [`aio_complete`], for [`Image::aio_submit`] and
/// [`Image::aio_readv`]; `None` if librbd could not make one, in which case the operation has
/// been finished here with `-ENOMEM`.
///
/// # Safety
/// `arg` comes from `Box::into_raw` and nothing else owns it: the completion's callback, or
/// whoever takes it back on a failure, frees it.
unsafe fn completion_for(arg: *mut Pending) -> Option<ffi::rbd_completion_t> {
    let mut c: ffi::rbd_completion_t = std::ptr::null_mut();
    let r = check(
        // SAFETY: `arg` stays valid until the callback takes it back (or until we do, below
        // or in `refused`, if the completion or the submission fails); valid out-pointer.
        unsafe { ffi::rbd_aio_create_completion(arg.cast(), Some(aio_complete), &mut c) },
        "rbd_aio_create_completion",
    );
    if r.is_err() {
        // SAFETY: no completion exists, so no callback will take the box: it is ours.
        let pending = unsafe { Box::from_raw(arg) };
        pending.finish(-(libc::ENOMEM as isize));
        return None;
    }
    Some(c)
}

/// librbd refused the operation (`r` < 0), so it will not call back (qemu's block/rbd.c
/// relies on the same): releases the completion and finishes the operation with `r` here.
///
/// # Safety
/// `c` is the completion [`completion_for`] made for `arg`, never submitted or released.
unsafe fn refused(c: ffi::rbd_completion_t, arg: *mut Pending, r: c_int) {
    // SAFETY: the completion was never submitted; released once.
    unsafe { ffi::rbd_aio_release(c) };
    // SAFETY: the callback will not run, so the box is ours again.
    let pending = unsafe { Box::from_raw(arg) };
    pending.finish(r as isize);
}

/// The completion callback given to `rbd_aio_create_completion`.
extern "C" fn aio_complete(c: ffi::rbd_completion_t, arg: *mut std::os::raw::c_void) {
    // SAFETY: `arg` is the `Box<Pending>` that `Image::aio_submit` or `Image::aio_readv`
    // leaked with `into_raw` for this completion alone, and librbd calls this once per
    // completion, so the box is taken back exactly once.
    let pending = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    // SAFETY: `c` is the live completion this callback was registered on; the operation is
    // complete (that is why we are called).
    let result = unsafe { ffi::rbd_aio_get_return_value(c) };
    // SAFETY: ours and complete; released once, here (as qemu's block/rbd.c does in its
    // callback). Nothing refers to it afterwards.
    unsafe { ffi::rbd_aio_release(c) };
    pending.finish(result);
}

impl Image {
    /// Starts `op` on `buf` and returns at once; `done` gets the buffer back with the result
    /// when librbd has completed it, on one of librbd's threads. The buffer is owned by the
    /// operation until then (so nothing the caller does, dropping everything included, can
    /// free it under librbd), and the image is not closed before every such operation has
    /// completed. `done` is always called exactly once: with `-EINVAL` for a range outside
    /// `buf`, `-ENOMEM` if no completion can be made, or librbd's `-errno` if it refuses the
    /// operation outright.
    pub fn aio_submit(&self, op: AioOp, buf: Vec<u8>, done: AioDone) {
        let range = match &op {
            AioOp::Read { at, .. } => Some(at.clone()),
            AioOp::Write { from, .. } => Some(from.clone()),
            AioOp::WriteZeroes { .. } | AioOp::Flush => None,
        };
        if let Some(r) = &range {
            if r.start > r.end || r.end > buf.len() {
                done(buf, -(libc::EINVAL as isize));
                return;
            }
        }
        self.in_flight.enter();
        let pending = Box::new(Pending {
            owned: Owned::One { buf, done },
            in_flight: self.in_flight.clone(),
        });
        let arg = Box::into_raw(pending);
        // SAFETY: `arg` is the box just leaked above, owned by nothing else.
        let Some(c) = (unsafe { completion_for(arg) }) else {
            return;
        };
        // SAFETY: `arg` points to the live `Pending` (only the callback frees it, and it
        // cannot run before the operation is submitted below). The buffer's heap block does
        // not move while the Vec sits in the box; librbd gets a pointer into it and the
        // box keeps it alive until the callback returns it.
        let base = match unsafe { &mut (*arg).owned } {
            Owned::One { buf, .. } => buf.as_mut_ptr(),
            Owned::Many { .. } => unreachable!("aio_submit boxes one buffer"),
        };
        let r = match (op, range) {
            (AioOp::Read { offset, .. }, Some(at)) => {
                // SAFETY: `at` lies inside the buffer (checked above), which the pending
                // operation owns until the callback; librbd writes at most `at.len()` bytes
                // there. Live image and completion.
                unsafe {
                    ffi::rbd_aio_read(
                        self.raw,
                        offset,
                        at.len(),
                        base.add(at.start).cast::<c_char>(),
                        c,
                    )
                }
            }
            (AioOp::Write { offset, .. }, Some(from)) => {
                // SAFETY: as for reads; librbd only reads the `from.len()` bytes (it copies
                // them or keeps the pointer until the completion, which the box outlives).
                unsafe {
                    ffi::rbd_aio_write(
                        self.raw,
                        offset,
                        from.len(),
                        base.add(from.start).cast::<c_char>(),
                        c,
                    )
                }
            }
            (AioOp::WriteZeroes { offset, len }, _) => match usize::try_from(len) {
                // SAFETY: live image and completion; no buffer; flags 0 (plain zeroing).
                Ok(len) => unsafe { ffi::rbd_aio_write_zeroes(self.raw, offset, len, c, 0, 0) },
                Err(_) => -libc::EINVAL,
            },
            // SAFETY: live image and completion.
            (AioOp::Flush, _) => unsafe { ffi::rbd_aio_flush(self.raw, c) },
            // Read and Write always carry their range (set from the op above).
            (AioOp::Read { .. } | AioOp::Write { .. }, None) => -libc::EINVAL,
        };
        if r < 0 {
            // SAFETY: librbd refused `c`, made for `arg` by `completion_for` above.
            unsafe { refused(c, arg, r) };
        }
    }

    /// Starts one `rbd_aio_readv` of the parts' ranges, back to back from `offset` (part
    /// `i` gets the bytes after those of parts `0..i`), and returns at once: one librbd read,
    /// so one OSD op per object it touches, instead of one per part. `done` gets the buffers
    /// back in the same order with librbd's result (the total length on success), on one of
    /// librbd's threads; as with [`Image::aio_submit`] the buffers belong to the operation
    /// until then, the image is not closed before it completes, and `done` is always called
    /// exactly once: with `-EINVAL` for no parts, more than [`MAX_READV_PARTS`], or a range
    /// outside its buffer.
    pub fn aio_readv(
        &self,
        offset: u64,
        parts: Vec<(Vec<u8>, std::ops::Range<usize>)>,
        done: AioDoneMany,
    ) {
        let bad = parts.is_empty()
            || parts.len() > MAX_READV_PARTS
            || parts
                .iter()
                .any(|(b, r)| r.start > r.end || r.end > b.len());
        let (bufs, ranges): (Vec<Vec<u8>>, Vec<std::ops::Range<usize>>) = parts.into_iter().unzip();
        if bad {
            done(bufs, -(libc::EINVAL as isize));
            return;
        }
        self.in_flight.enter();
        let arg = Box::into_raw(Box::new(Pending {
            owned: Owned::Many {
                bufs,
                iov: Vec::with_capacity(ranges.len()),
                done,
            },
            in_flight: self.in_flight.clone(),
        }));
        // SAFETY: `arg` is the live box just made; nothing else refers to it until the
        // operation is submitted below, so this is the only reference. Each buffer's heap
        // block stays where it is while its Vec sits in the box (the outer Vec is never
        // changed again), and `iov` gets its final length here, within its capacity, so
        // neither it nor the blocks it points into move before the callback frees the box.
        let (iov_ptr, iov_len) = match unsafe { &mut (*arg).owned } {
            Owned::Many { bufs, iov, .. } => {
                for (b, r) in bufs.iter_mut().zip(&ranges) {
                    iov.push(libc::iovec {
                        // SAFETY: `r` lies inside `b` (checked above).
                        iov_base: unsafe { b.as_mut_ptr().add(r.start) }.cast(),
                        iov_len: r.len(),
                    });
                }
                (iov.as_ptr(), iov.len())
            }
            Owned::One { .. } => unreachable!("aio_readv boxes several buffers"),
        };
        // SAFETY: `arg` is the box just leaked above, owned by nothing else.
        let Some(c) = (unsafe { completion_for(arg) }) else {
            return;
        };
        // SAFETY: `iov_ptr` is `iov_len` (1..=MAX_READV_PARTS, so it fits a c_int) iovecs,
        // each pointing at writable bytes of a buffer the pending operation owns until the
        // callback; the array itself lives in the same box. Live image and completion.
        let r = unsafe { ffi::rbd_aio_readv(self.raw, iov_ptr, iov_len as c_int, offset, c) };
        if r < 0 {
            // SAFETY: librbd refused `c`, made for `arg` by `completion_for` above.
            unsafe { refused(c, arg, r) };
        }
    }

    /// Operations started with [`Image::aio_submit`] or [`Image::aio_readv`] whose callback
    /// has not finished.
    pub fn aio_in_flight(&self) -> usize {
        self.in_flight.count()
    }
}
