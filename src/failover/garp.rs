//! Announcements from clbd itself after a claim, so neighbours and switches
//! learn the VIP's new MAC at once: a gratuitous ARP on a packet socket
//! (IPv4) and an unsolicited neighbour advertisement on an ICMPv6 socket
//! (IPv6). Before, clb ran iputils' `arping` and `ndsend`; a host without
//! them claimed "successfully" with only a WARN while clients kept the dead
//! host's MAC until their cache expired, and `ndsend` is in no Debian package
//! (not in ndisc6, where the docs said), so IPv6 VIPs were never announced.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::netlink::{self, Socket};

/// An ARP request with sender and target both `addr` (the form iputils'
/// `arping -U` sends); Linux neighbours update an existing entry on it.
fn packet(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&addr.octets());
    // Target hardware address stays zero.
    p[24..28].copy_from_slice(&addr.octets());
    p
}

/// Broadcasts one gratuitous ARP for `addr` on `iface`.
pub fn announce(iface: &str, addr: Ipv4Addr) -> io::Result<()> {
    let index = netlink::if_index(iface)?;
    let proto = (libc::ETH_P_ARP as u16).to_be();
    let socket = Socket::new(libc::AF_PACKET, libc::SOCK_DGRAM, proto as libc::c_int)?;
    let p = packet(hw_addr(&socket, iface)?, addr);
    // SAFETY: a zeroed sockaddr_ll, then filled in.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as libc::c_ushort;
    to.sll_protocol = proto;
    to.sll_ifindex = index as libc::c_int;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    socket.send_to(&p, &to)
}

/// An unsolicited neighbour advertisement for `addr` (RFC 4861 4.4): not a
/// reply to a solicitation, override set, with our link-layer address. The
/// kernel fills in the checksum of an ICMPv6 socket.
fn advertisement(mac: [u8; 6], addr: Ipv6Addr) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 136; // neighbour advertisement
    p[4] = 0x20; // override
    p[8..24].copy_from_slice(&addr.octets());
    p[24] = 2; // option: target link-layer address
    p[25] = 1; // in units of 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}

/// Sends one unsolicited neighbour advertisement for `addr` to all nodes on
/// `iface` (hop limit 255, as neighbour discovery requires).
pub fn advertise(iface: &str, addr: Ipv6Addr) -> io::Result<()> {
    let index = netlink::if_index(iface)?;
    let socket = Socket::new(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6)?;
    let mac = hw_addr(&socket, iface)?;
    socket.set(
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_HOPS,
        &255 as &libc::c_int,
    )?;
    socket.set(
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_IF,
        &(index as libc::c_int),
    )?;
    let at = |a: Ipv6Addr| {
        // SAFETY: a zeroed sockaddr_in6, then filled in.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = a.octets();
        sa.sin6_scope_id = index;
        sa
    };
    // From the VIP itself (added without duplicate address detection, so
    // usable at once), not the link-local address the kernel would pick:
    // right after the link comes up that one can still be tentative, and the
    // send failed with EADDRNOTAVAIL in tests/cluster/test_failover.rs. Once
    // the VIP is released the bind fails, so nothing is announced after.
    socket.bind(&at(addr))?;
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    socket.send_to(&advertisement(mac, addr), &at(all_nodes))
}

/// The interface's MAC address (SIOCGIFHWADDR).
fn hw_addr(socket: &Socket, iface: &str) -> io::Result<[u8; 6]> {
    // SAFETY: a zeroed ifreq is a valid request; the name is copied in below.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the union's hwaddr member of our ifreq.
    let r = unsafe { libc::ioctl(socket.fd(), libc::SIOCGIFHWADDR as _, &mut req) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote ifru_hwaddr.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packet_names_the_address_as_sender_and_target() {
        let mac = [2, 0, 0, 0, 0, 7];
        let p = packet(mac, Ipv4Addr::new(192, 0, 2, 9));
        assert_eq!(&p[0..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[8..14], &mac);
        assert_eq!(&p[14..18], &[192, 0, 2, 9]);
        assert_eq!(&p[18..24], &[0; 6]);
        assert_eq!(&p[24..28], &[192, 0, 2, 9]);
    }

    #[test]
    fn the_advertisement_overrides_and_carries_our_mac() {
        let mac = [2, 0, 0, 0, 0, 7];
        let a: Ipv6Addr = "2001:db8::9".parse().unwrap();
        let p = advertisement(mac, a);
        assert_eq!(&p[0..8], &[136, 0, 0, 0, 0x20, 0, 0, 0]);
        assert_eq!(&p[8..24], &a.octets());
        assert_eq!(&p[24..32], &[2, 1, 2, 0, 0, 0, 0, 7]);
    }
}
