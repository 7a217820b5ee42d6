//! Adds and removes the VIP on an interface with one rtnetlink request, as
//! `ip addr add|del` does, without forking a program.
//!
//! Why: when a leader is cut off from the voters, its release must return
//! within `election_timeout_max - lease` (13 ms at the default timers,
//! docs/failover.md), and a forked `ip` took 2-19 ms in the failover drills,
//! longer on a busy host. The netlink request takes well under a millisecond.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

const NLMSG_HDRLEN: usize = 16;
/// `IFA_F_NODAD`: no duplicate address detection (it would hold an IPv6
/// address back for a second).
const IFA_F_NODAD: u8 = 0x02;

/// Adds (`add`) or removes `addr` as a host address (/32, /128) on `iface`.
/// Idempotent: adding an address that is there, or removing one that is
/// not, succeeds. `timeout` bounds the wait for the kernel's answer.
pub fn change_address(add: bool, iface: &str, addr: IpAddr, timeout: Duration) -> io::Result<()> {
    let index = if_index(iface)?;
    let request = encode(add, index, addr, 1);
    let socket = route_socket(timeout)?;
    // SAFETY: a zeroed sockaddr_nl addresses the kernel (pid 0).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    socket.send_to(&request, &kernel)?;
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf)?;
    match decode_ack(&buf[..n], 1)? {
        0 => Ok(()),
        e if add && e == libc::EEXIST => Ok(()),
        e if !add && e == libc::EADDRNOTAVAIL => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

pub(super) fn if_index(iface: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(iface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name with NUL"))?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {iface}"),
        ));
    }
    Ok(index)
}

/// One `RTM_NEWADDR`/`RTM_DELADDR` request asking for an acknowledgement.
fn encode(add: bool, index: u32, addr: IpAddr, seq: u32) -> Vec<u8> {
    let (family, prefix, bytes): (u8, u8, Vec<u8>) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, 32, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, 128, a.octets().to_vec()),
    };
    let (kind, mut flags) = match add {
        true => (libc::RTM_NEWADDR, libc::NLM_F_CREATE | libc::NLM_F_EXCL),
        false => (libc::RTM_DELADDR, 0),
    };
    flags |= libc::NLM_F_REQUEST | libc::NLM_F_ACK;
    let mut body = vec![
        family,
        prefix,
        if add && addr.is_ipv6() {
            IFA_F_NODAD
        } else {
            0
        },
        0, // RT_SCOPE_UNIVERSE
    ];
    body.extend_from_slice(&index.to_ne_bytes());
    for attr in [libc::IFA_LOCAL, libc::IFA_ADDRESS] {
        let len = 4 + bytes.len();
        body.extend_from_slice(&(len as u16).to_ne_bytes());
        body.extend_from_slice(&attr.to_ne_bytes());
        body.extend_from_slice(&bytes);
        body.resize(body.len().next_multiple_of(4), 0);
    }
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags as u16).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    msg
}

/// The errno of the kernel's acknowledgement of request `seq` (0: done).
fn decode_ack(buf: &[u8], seq: u32) -> io::Result<i32> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {why}"));
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let u32_at = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let len = u32_at(at) as usize;
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        let their_seq = u32_at(at + 8);
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return Err(bad("truncated answer"));
        }
        if kind == libc::NLMSG_ERROR as u16 && their_seq == seq {
            if len < NLMSG_HDRLEN + 4 {
                return Err(bad("short error message"));
            }
            let errno =
                i32::from_ne_bytes([buf[at + 16], buf[at + 17], buf[at + 18], buf[at + 19]]);
            return Ok(-errno);
        }
        at += len.next_multiple_of(4);
    }
    Err(bad("no acknowledgement"))
}

/// A socket descriptor, closed on drop; shared with garp.rs.
pub(super) struct Socket(libc::c_int);

impl Socket {
    /// socket(2) with close-on-exec.
    pub(super) fn new(
        domain: libc::c_int,
        kind: libc::c_int,
        proto: libc::c_int,
    ) -> io::Result<Self> {
        // SAFETY: plain socket(2); the descriptor is owned by `Socket`.
        let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket(fd))
    }

    pub(super) fn fd(&self) -> libc::c_int {
        self.0
    }

    /// setsockopt(2) with a plain value.
    pub(super) fn set<T>(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: &T,
    ) -> io::Result<()> {
        // SAFETY: `value` is valid for its size.
        let r = unsafe {
            libc::setsockopt(
                self.0,
                level,
                name,
                value as *const T as *const libc::c_void,
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        match r {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// bind(2) to a socket address of type `A`.
    pub(super) fn bind<A>(&self, addr: &A) -> io::Result<()> {
        // SAFETY: `addr` is a socket address valid for its size.
        let r = unsafe {
            libc::bind(
                self.0,
                addr as *const A as *const libc::sockaddr,
                std::mem::size_of::<A>() as libc::socklen_t,
            )
        };
        match r {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    }

    /// sendto(2) to a socket address of type `A`.
    pub(super) fn send_to<A>(&self, msg: &[u8], to: &A) -> io::Result<()> {
        // SAFETY: msg and `to` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0,
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                to as *const A as *const libc::sockaddr,
                std::mem::size_of::<A>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: our own descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// A route netlink socket whose answers are awaited at most `timeout`.
fn route_socket(timeout: Duration) -> io::Result<Socket> {
    let socket = Socket::new(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    socket.set(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_laid_out_as_the_kernel_reads_it() {
        let m = encode(true, 7, "192.0.2.9".parse().unwrap(), 1);
        // Header 16 + ifaddrmsg 8 + two 8-byte attributes.
        assert_eq!(m.len(), 40);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 40);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            libc::RTM_NEWADDR
        );
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 32, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
        assert_eq!(&m[28..32], &[192, 0, 2, 9]);
        let m = encode(false, 7, "2001:db8::9".parse().unwrap(), 1);
        // IPv6: two 20-byte attributes; no NODAD flag on a removal.
        assert_eq!(m.len(), 16 + 8 + 40);
        assert_eq!(&m[16..20], &[libc::AF_INET6 as u8, 128, 0, 0]);
        assert_eq!(
            encode(true, 7, "2001:db8::9".parse().unwrap(), 1)[18],
            IFA_F_NODAD
        );
    }

    #[test]
    fn acknowledgements_and_errors_are_read() {
        let ack = |errno: i32, seq: u32| {
            let mut b = Vec::new();
            b.extend_from_slice(&36u32.to_ne_bytes());
            b.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&(-errno).to_ne_bytes());
            b.extend_from_slice(&[0u8; 16]);
            b
        };
        assert_eq!(decode_ack(&ack(0, 1), 1).unwrap(), 0);
        assert_eq!(decode_ack(&ack(libc::EEXIST, 1), 1).unwrap(), libc::EEXIST);
        assert!(decode_ack(&ack(0, 2), 1).is_err());
        assert!(decode_ack(&[1, 2, 3], 1).is_err());
    }

    #[test]
    fn an_unknown_interface_is_named() {
        let e = change_address(
            true,
            "clb-no-such0",
            "192.0.2.1".parse().unwrap(),
            Duration::from_millis(100),
        )
        .unwrap_err();
        assert!(e.to_string().contains("clb-no-such0"), "{e}");
    }
}
