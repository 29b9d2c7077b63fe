//! Interface queries: name, index, MAC address, MTU and flags through the classic `SIOCGIF*`
//! ioctls of netdevice(7).
//!
//! The ioctls act on the network namespace of the socket they are issued on, which is why the
//! module works on a caller-supplied file descriptor internally: [`interface_info`] makes a
//! throw-away datagram socket in the calling thread's namespace, while
//! [`PacketSocket::refresh_info`](crate::PacketSocket::refresh_info) reuses its own socket so that
//! it queries the namespace the socket lives in whatever thread calls it. `/sys/class/net` is not
//! used: it shows the namespace sysfs was mounted in, not the calling thread's.

use std::ffi::CStr;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::cvt;

/// What the kernel reports about one network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// Interface name, e.g. `eth0` (at most 15 bytes, netdevice(7) `IFNAMSIZ`).
    pub name: String,
    /// Interface index (`SIOCGIFINDEX`); 1 is normally `lo`. Indices are unique per namespace.
    pub index: u32,
    /// Hardware address (`SIOCGIFHWADDR`). All zeros for loopback and for interfaces without
    /// an Ethernet-style 6-byte address.
    pub mac: [u8; 6],
    /// MTU (`SIOCGIFMTU`): the largest payload after the 14-byte Ethernet header. See
    /// [`frame_capacity`](crate::frame_capacity) for the matching buffer size.
    pub mtu: u32,
    /// `IFF_UP`: the interface is administratively up (`ip link set ... up`). This does not
    /// say whether it has a carrier (a veth whose peer is down is still `up` here).
    pub up: bool,
    /// `IFF_LOOPBACK`: this is a loopback interface (`lo`).
    pub loopback: bool,
}

/// Returns what the kernel knows about the interface `name` in the calling thread's network
/// namespace.
///
/// # Errors
///
/// * [`io::ErrorKind::NotFound`], with a message naming the interface, if there is no such
///   interface in this namespace.
/// * [`io::ErrorKind::InvalidInput`] if `name` cannot be an interface name (empty, 16 bytes or
///   longer, or containing a NUL byte).
/// * Any error of `socket(2)` or `ioctl(2)`.
pub fn interface_info(name: &str) -> io::Result<InterfaceInfo> {
    let sock = query_socket()?;
    info_by_name(sock.as_raw_fd(), name)
}

/// Lists every interface of the calling thread's network namespace, sorted by index.
///
/// Names come from `if_nameindex(3)` (a netlink dump in glibc, so it sees the calling thread's
/// namespace), details from the same ioctls as [`interface_info`]. An interface that disappears
/// between the two steps is left out rather than reported as an error.
pub fn list_interfaces() -> io::Result<Vec<InterfaceInfo>> {
    let names = interface_names()?;
    let sock = query_socket()?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        match info_by_name(sock.as_raw_fd(), &name) {
            Ok(info) => out.push(info),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    out.sort_by_key(|i| i.index);
    Ok(out)
}

/// Names of all interfaces, from `if_nameindex(3)`.
fn interface_names() -> io::Result<Vec<String>> {
    // SAFETY: if_nameindex takes no arguments; it returns either NULL (errno set) or an array
    // that we free with if_freenameindex below and do not use afterwards.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut entry = list;
    loop {
        // SAFETY: `entry` points into the array returned by if_nameindex, which is terminated
        // by an entry with if_index 0 and a NULL name; we stop at that entry, so every entry
        // we read is inside the array.
        let item = unsafe { &*entry };
        if item.if_index == 0 || item.if_name.is_null() {
            break;
        }
        // SAFETY: if_name of a non-terminal entry is a valid NUL-terminated string owned by
        // the array, alive until if_freenameindex.
        let name = unsafe { CStr::from_ptr(item.if_name) };
        names.push(name.to_string_lossy().into_owned());
        // SAFETY: this entry was not the terminator, so the next one is still in the array.
        entry = unsafe { entry.add(1) };
    }
    // SAFETY: `list` came from if_nameindex and is freed exactly once; no reference into it
    // (`item`, `name`) outlives this point because the names were copied into Strings.
    unsafe { libc::if_freenameindex(list) };
    Ok(names)
}

/// A datagram socket used only as a handle for the `SIOCGIF*` ioctls, created in the calling
/// thread's network namespace.
fn query_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes only integers; the result is checked below.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2), is open, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` with `ifr_name` set to `name`.
fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{name:?} is not a valid network interface name (1 to {} bytes, no NUL)",
                libc::IFNAMSIZ - 1
            ),
        ));
    }
    // SAFETY: ifreq is a plain C struct (a char array and a union of integers, sockaddrs and a
    // raw pointer); all-zero bytes are a valid value of every field.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // The remaining bytes of ifr_name stay zero, so the name is NUL-terminated.
    Ok(req)
}

/// Issues one `SIOCGIF*` request; ENODEV becomes a NotFound error naming the interface.
fn ifreq_ioctl(
    fd: RawFd,
    request: libc::c_ulong,
    req: &mut libc::ifreq,
    what: &dyn std::fmt::Display,
) -> io::Result<()> {
    // SAFETY: `req` is a valid, exclusively borrowed ifreq. Every request this module issues
    // (SIOCGIFINDEX, SIOCGIFNAME, SIOCGIFHWADDR, SIOCGIFMTU, SIOCGIFFLAGS) reads ifr_name or
    // ifr_ifindex and writes only inside the struct (netdevice(7)).
    let ret = unsafe { libc::ioctl(fd, request, req as *mut libc::ifreq) };
    if ret == -1 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENODEV) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("network interface {what} not found in this network namespace"),
            ));
        }
        return Err(err);
    }
    Ok(())
}

/// Full information about interface `name`, queried through the socket `fd` (and so in that
/// socket's network namespace).
pub(crate) fn info_by_name(fd: RawFd, name: &str) -> io::Result<InterfaceInfo> {
    let quoted = format!("{name:?}");
    let mut req = ifreq_for(name)?;

    ifreq_ioctl(fd, libc::SIOCGIFINDEX, &mut req, &quoted)?;
    // SAFETY: SIOCGIFINDEX succeeded, so the kernel stored the index in ifru_ifindex; every
    // bit pattern is a valid c_int anyway.
    let index = unsafe { req.ifr_ifru.ifru_ifindex };

    ifreq_ioctl(fd, libc::SIOCGIFHWADDR, &mut req, &quoted)?;
    // SAFETY: SIOCGIFHWADDR stores a sockaddr in ifru_hwaddr; sockaddr is plain integers, so
    // reading it is valid whatever the kernel wrote.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (dst, &src) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *dst = src as u8;
    }

    ifreq_ioctl(fd, libc::SIOCGIFMTU, &mut req, &quoted)?;
    // SAFETY: SIOCGIFMTU stores the MTU in ifru_mtu, a plain c_int.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };

    ifreq_ioctl(fd, libc::SIOCGIFFLAGS, &mut req, &quoted)?;
    // SAFETY: SIOCGIFFLAGS stores the low 16 flag bits in ifru_flags, a plain c_short.
    let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags } as u16);

    Ok(InterfaceInfo {
        name: name.to_owned(),
        index: u32::try_from(index).unwrap_or(0),
        mac,
        mtu: u32::try_from(mtu).unwrap_or(0),
        up: flags & libc::IFF_UP != 0,
        loopback: flags & libc::IFF_LOOPBACK != 0,
    })
}

/// Full information about the interface with index `index`, queried through `fd`. Used to
/// refresh a socket's view even if the interface was renamed.
pub(crate) fn info_by_index(fd: RawFd, index: u32) -> io::Result<InterfaceInfo> {
    // SAFETY: see ifreq_for: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    req.ifr_ifru.ifru_ifindex = libc::c_int::try_from(index).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface index {index} out of range"),
        )
    })?;
    let what = format!("with index {index}");
    ifreq_ioctl(fd, libc::SIOCGIFNAME, &mut req, &what)?;
    // SAFETY: after a successful SIOCGIFNAME the kernel wrote a NUL-terminated name of at most
    // IFNAMSIZ - 1 bytes into ifr_name, which is IFNAMSIZ bytes long; the zeroed struct
    // guarantees a NUL even if it wrote less.
    let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    info_by_name(fd, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_impossible_names_without_a_syscall() {
        for bad in ["", "a-name-that-is-too-long", "nul\0inside"] {
            let err = interface_info(bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {err}");
        }
    }

    #[test]
    fn missing_interface_is_not_found_and_named() {
        let err = interface_info("nosuchif0").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("nosuchif0"), "{err}");
    }

    #[test]
    fn loopback_is_listed() {
        let all = list_interfaces().unwrap();
        let lo = all
            .iter()
            .find(|i| i.loopback)
            .expect("a loopback interface");
        assert_eq!(lo.mac, [0; 6]);
        assert!(all.windows(2).all(|w| w[0].index < w[1].index));
        assert_eq!(interface_info(&lo.name).unwrap(), *lo);
    }
}
