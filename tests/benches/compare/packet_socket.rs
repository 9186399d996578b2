//! The flood's frames where the kernel refuses XDP live frames: `BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` answers EPERM on some hosts (this Firecracker guest among
//! them: any program, any namespace, as root), though plain test runs work.
//!
//! Then an `AF_PACKET` socket sends the template, `sendmmsg` in batches with the qdisc
//! bypassed, into a second veth pair inside the attacker's namespace, whose far end runs the
//! same generator program natively: it gives each frame its source and redirects it into
//! the attacker's veth. So the server still receives xdp_frames through its veth's NAPI, as
//! with live frames and as off a NIC; only the sender's side costs more (an skb per frame,
//! on the generator's CPU, which is not measured).

use std::time::{Duration, Instant};

/// Frames one `sendmmsg` hands the kernel.
const BATCH: usize = 256;

/// `template` sent on `ifindex` until `packets` went or `max_time` passed; what the socket
/// took, and the time it took. Runs in the calling thread's network namespace.
pub fn flood(ifindex: u32, template: &[u8], packets: u64, max_time: Duration) -> (u64, Duration) {
    // SAFETY: plain socket calls on values that outlive them; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a zeroed sockaddr_ll is valid; its size is passed.
    unsafe {
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        let rc = libc::bind(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(
            rc,
            0,
            "bind to the veth: {}",
            std::io::Error::last_os_error()
        );
        let one: libc::c_int = 1;
        // PACKET_QDISC_BYPASS: straight to the driver, as a generator wants.
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            20,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    let start = Instant::now();
    let mut sent = 0u64;
    // Every message is the template: the program at the far end rewrites the source.
    let mut iov = libc::iovec {
        iov_base: template.as_ptr() as *mut libc::c_void,
        iov_len: template.len(),
    };
    // SAFETY: a zeroed mmsghdr is valid (no name, no control).
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &raw mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    while sent < packets && start.elapsed() < max_time {
        let n = BATCH.min((packets - sent) as usize);
        // SAFETY: `msgs[..n]` point at `iov` and the template, which outlive the call.
        let rc = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as u32, 0) };
        if rc > 0 {
            sent += rc as u64;
        } else {
            // ENOBUFS: the veth's ring is full; the receiver is behind. Let it catch up.
            std::thread::yield_now();
        }
    }
    let elapsed = start.elapsed();
    // SAFETY: the fd is ours.
    unsafe { libc::close(fd) };
    (sent, elapsed)
}
