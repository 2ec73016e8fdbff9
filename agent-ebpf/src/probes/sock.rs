//! `sock:*` tracepoints: tie in-flight syscalls to TCP sockets, and report 4-tuples.
use agent_common::{
    AF_INET, AF_INET6, SockEvent, direction,
    hooks::{set_state, sock_io},
    kind, tcp_state,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    capture::{sock_event, submit_sock},
    maps::{OWN_SOCKS, self_tgid},
    probes::{ctx_field, syscalls::mark_pending},
};

const IPPROTO_TCP: u16 = 6;

// sock_send_length / sock_recv_length: sk@8, family@16 u16, protocol@18 u16, ret@20, flags@24.
#[tracepoint(category = "sock", name = "sock_send_length")]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    on_sock_io(&ctx, direction::EGRESS).unwrap_or(0)
}

#[tracepoint(category = "sock", name = "sock_recv_length")]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    on_sock_io(&ctx, direction::INGRESS).unwrap_or(0)
}

#[inline(always)]
fn on_sock_io(ctx: &TracePointContext, dir: u8) -> Result<u32, i64> {
    let family: u16 = ctx_field(ctx, sock_io::FAMILY.offset);
    let protocol: u16 = ctx_field(ctx, sock_io::PROTOCOL.offset);
    if (family != AF_INET && family != AF_INET6) || protocol != IPPROTO_TCP {
        return Ok(0);
    }
    let sk: u64 = ctx_field(ctx, sock_io::SK.offset);
    mark_pending(bpf_get_current_pid_tgid(), sk, false, dir);
    Ok(0)
}

// inet_sock_set_state: its fields in `agent_common::hooks::set_state` (ports in host order).
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    on_state(&ctx).unwrap_or(0)
}

#[inline(always)]
fn on_state(ctx: &TracePointContext) -> Result<u32, i64> {
    let protocol: u16 = ctx_field(ctx, set_state::PROTOCOL.offset);
    if protocol != IPPROTO_TCP {
        return Ok(0);
    }
    let newstate: i32 = ctx_field(ctx, set_state::NEWSTATE.offset);
    let sk: u64 = ctx_field(ctx, set_state::SKADDR.offset);
    if newstate == i32::from(tcp_state::SYN_SENT) {
        // Process context of connect(): mark that syscall as TCP.
        let pid_tgid = bpf_get_current_pid_tgid();
        if (pid_tgid >> 32) as u32 == self_tgid() {
            let _ = OWN_SOCKS.insert(sk, 1, 0);
        } else {
            mark_pending(pid_tgid, sk, true, 0);
        }
        return Ok(0);
    }
    if newstate != i32::from(tcp_state::ESTABLISHED) && newstate != i32::from(tcp_state::CLOSE) {
        return Ok(0);
    }
    let oldstate: i32 = ctx_field(ctx, set_state::OLDSTATE.offset);
    let family: u16 = ctx_field(ctx, set_state::FAMILY.offset);
    let sport: u16 = ctx_field(ctx, set_state::SPORT.offset);
    let dport: u16 = ctx_field(ctx, set_state::DPORT.offset);
    let mode = crate::maps::port_mode();
    if mode != 0 && !crate::maps::ports_selected(mode, sport, dport) {
        return Ok(0);
    }
    let mut local_addr = [0u8; 16];
    let mut remote_addr = [0u8; 16];
    if family == AF_INET {
        let s: [u8; 4] = unsafe { ctx.read_at(set_state::SADDR.offset) }.map_err(i64::from)?;
        let d: [u8; 4] = unsafe { ctx.read_at(set_state::DADDR.offset) }.map_err(i64::from)?;
        local_addr[..4].copy_from_slice(&s);
        remote_addr[..4].copy_from_slice(&d);
    } else {
        local_addr = unsafe { ctx.read_at(set_state::SADDR_V6.offset) }.map_err(i64::from)?;
        remote_addr = unsafe { ctx.read_at(set_state::DADDR_V6.offset) }.map_err(i64::from)?;
    }
    // Often softirq context: pid/comm are whoever was on the CPU, so they are left out; pid is
    // set to the agent's own tgid for the agent's own sockets.
    // SAFETY: the value is copied at once.
    let own = unsafe { OWN_SOCKS.get(sk).is_some() };
    if own && newstate == i32::from(tcp_state::CLOSE) {
        let _ = OWN_SOCKS.remove(sk);
    }
    let ev = SockEvent {
        family,
        local_port: sport,
        remote_port: dport,
        old_state: oldstate as u8,
        new_state: newstate as u8,
        local_addr,
        remote_addr,
        ..sock_event(kind::TCP_STATE, sk, 0, if own { self_tgid() } else { 0 })
    };
    submit_sock(&ev)?;
    Ok(0)
}

/// A socket's (local, remote) ports, read from the socket itself (`None`: offsets unknown).
#[inline(always)]
pub fn ports(sk: u64) -> Option<(u16, u16)> {
    let o = crate::maps::sock_offsets();
    if o.valid == 0 || sk == 0 {
        return None;
    }
    let at = |off: u32| (sk + u64::from(off)) as *const u16;
    // SAFETY: kernel memory read through bpf_probe_read_kernel, which tolerates any address.
    let dport: u16 = unsafe { bpf_probe_read_kernel(at(o.dport)) }.ok()?;
    let num: u16 = unsafe { bpf_probe_read_kernel(at(o.num)) }.ok()?;
    Some((num, u16::from_be(dport)))
}

/// Reports the 4-tuple of a socket the agent never saw established (opened before it started),
/// read from the socket itself, as a synthetic ESTABLISHED event (old state 0). Userspace could
/// look it up in /proc, but a short exchange is over, and its socket gone, by then.
#[inline(always)]
pub fn report_tuple(sk: u64) -> Result<(), i64> {
    let o = crate::maps::sock_offsets();
    if o.valid == 0 || sk == 0 {
        return Ok(());
    }
    let at = |off: u32| (sk + u64::from(off)) as *const u8;
    // SAFETY: kernel memory read through bpf_probe_read_kernel, which tolerates any address.
    let family: u16 = unsafe { bpf_probe_read_kernel(at(o.family).cast()) }.map_err(i64::from)?;
    let dport: u16 = unsafe { bpf_probe_read_kernel(at(o.dport).cast()) }.map_err(i64::from)?;
    let num: u16 = unsafe { bpf_probe_read_kernel(at(o.num).cast()) }.map_err(i64::from)?;
    let mut local_addr = [0u8; 16];
    let mut remote_addr = [0u8; 16];
    if family == AF_INET {
        let s: [u8; 4] = unsafe { bpf_probe_read_kernel(at(o.rcv_saddr).cast()) }.map_err(i64::from)?;
        let d: [u8; 4] = unsafe { bpf_probe_read_kernel(at(o.daddr).cast()) }.map_err(i64::from)?;
        local_addr[..4].copy_from_slice(&s);
        remote_addr[..4].copy_from_slice(&d);
    } else if family == AF_INET6 {
        local_addr = unsafe { bpf_probe_read_kernel(at(o.v6_rcv_saddr).cast()) }.map_err(i64::from)?;
        remote_addr = unsafe { bpf_probe_read_kernel(at(o.v6_daddr).cast()) }.map_err(i64::from)?;
    } else {
        return Ok(());
    }
    let ev = SockEvent {
        family,
        local_port: num,
        remote_port: u16::from_be(dport),
        old_state: 0,
        new_state: tcp_state::ESTABLISHED,
        local_addr,
        remote_addr,
        ..sock_event(kind::TCP_STATE, sk, 0, 0)
    };
    submit_sock(&ev)
}
