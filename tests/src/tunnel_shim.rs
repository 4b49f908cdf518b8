//! A shim that lets BPF_PROG_TEST_RUN reach `ferrite_from_overlay` the way the
//! kernel's VXLAN device does: with tunnel metadata. A test run's skb has none (the
//! program drops it as `drop_internal`), and BPF_PROG_TEST_RUN cannot pass any, so a
//! tiny program (raw instructions, loaded here, not part of the datapath object)
//! attaches a received-packet tunnel key with `bpf_skb_set_tunnel_key` (VNI, and the
//! sending node as the key's source, which is what `bpf_skb_get_tunnel_key` reports
//! as `remote_ipv4`) and tail-calls the program under test from a program array.
//! The same shim tail-calling the no-op program is that path's baseline, so the
//! shim's own cost cancels out.
use std::{
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Context, Result};
use nix::libc;

use crate::testbed::RunResult;

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_PROG_LOAD: u32 = 5;
const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const HELPER_TAIL_CALL: i32 = 12;
const HELPER_SKB_SET_TUNNEL_KEY: i32 = 21;
/// sizeof(struct bpf_tunnel_key) since Linux 6.0 (with `local_ipv4`).
const TUNNEL_KEY_SIZE: i32 = 44;
const TUNNEL_KEY_LOCAL_IPV4: i16 = 28;
const TC_ACT_SHOT: i32 = 2;

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

fn bpf<T>(cmd: u32, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr for `cmd`, every
    // pointer in it valid for the call; the kernel reads (and for test runs writes)
    // only `size_of::<T>()` bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn name(text: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..text.len().min(15)].copy_from_slice(&text.as_bytes()[..text.len().min(15)]);
    out
}

/// One BPF instruction (struct bpf_insn, little-endian).
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[0] = code;
    out[1] = dst | (src << 4);
    out[2..4].copy_from_slice(&off.to_le_bytes());
    out[4..8].copy_from_slice(&imm.to_le_bytes());
    out
}

/// The shim: set the tunnel key, tail-call slot `slot` of `map_fd`, else drop.
fn shim_program(map_fd: i32, slot: i32, vni: u32, remote: Ipv4Addr) -> Vec<[u8; 8]> {
    const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const ADD_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const STX_DW: u8 = 0x7b; // BPF_STX | BPF_MEM | BPF_DW
    const ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
    const CALL: u8 = 0x85;
    const JNE_K: u8 = 0x55;
    const LD_IMM64: u8 = 0x18;
    const EXIT: u8 = 0x95;
    let key = -48i16; // the key on the stack, 8-aligned, zeroed
    let mut p = vec![insn(MOV_X, 6, 1, 0, 0), insn(MOV_K, 7, 0, 0, 0)];
    for word in 0..6 {
        p.push(insn(STX_DW, 10, 7, key + word * 8, 0));
    }
    p.extend([
        insn(ST_W, 10, 0, key, vni as i32),
        // The sending node: set as the key's local address, the tunnel's source on
        // receive, which bpf_skb_get_tunnel_key reports as remote_ipv4.
        insn(
            ST_W,
            10,
            0,
            key + TUNNEL_KEY_LOCAL_IPV4,
            u32::from(remote) as i32,
        ),
        insn(MOV_X, 1, 6, 0, 0),
        insn(MOV_X, 2, 10, 0, 0),
        insn(ADD_K, 2, 0, 0, key as i32),
        insn(MOV_K, 3, 0, 0, TUNNEL_KEY_SIZE),
        insn(MOV_K, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_SKB_SET_TUNNEL_KEY),
        insn(JNE_K, 0, 0, 5, 0),
        insn(MOV_X, 1, 6, 0, 0),
        insn(LD_IMM64, 2, BPF_PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV_K, 3, 0, 0, slot),
        insn(CALL, 0, 0, 0, HELPER_TAIL_CALL),
        insn(MOV_K, 0, 0, 0, TC_ACT_SHOT),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

fn load(program: &[[u8; 8]], prog_name: &str) -> Result<OwnedFd> {
    let license = b"GPL\0";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name(prog_name),
        ..Default::default()
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a new file descriptor the kernel just returned, owned by no one else.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(error) => {
            // Again with the verifier's log, for the message.
            let mut log = vec![0u8; 1 << 16];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let retry = bpf(BPF_PROG_LOAD, &mut attr);
            let text = String::from_utf8_lossy(&log);
            anyhow::bail!(
                "loading {prog_name}: {error} ({retry:?}); verifier: {}",
                text.trim_end_matches('\0')
            )
        }
    }
}

/// Tunnel-key shims in front of several programs (one slot each).
pub struct TunnelShim {
    programs: Vec<OwnedFd>,
    _array: OwnedFd,
}

impl TunnelShim {
    /// A shim per program of `targets` (loaded SCHED_CLS programs), each handing its
    /// packets tunnel metadata for VNI `vni` from the node `remote`.
    pub fn new(targets: &[BorrowedFd<'_>], vni: u32, remote: Ipv4Addr) -> Result<Self> {
        let mut create = MapCreateAttr {
            map_type: BPF_MAP_TYPE_PROG_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: targets.len() as u32,
            map_name: name("fbench_shim"),
            ..Default::default()
        };
        let fd = bpf(BPF_MAP_CREATE, &mut create).context("creating the shim's program array")?;
        // SAFETY: a new file descriptor the kernel just returned.
        let array = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut programs = Vec::new();
        for (slot, target) in targets.iter().enumerate() {
            let program = load(
                &shim_program(array.as_raw_fd(), slot as i32, vni, remote),
                "fbench_tunnel",
            )?;
            let (key, value) = (slot as u32, target.as_raw_fd() as u32);
            let mut update = MapUpdateAttr {
                map_fd: array.as_raw_fd() as u32,
                key: &key as *const u32 as u64,
                value: &value as *const u32 as u64,
                ..Default::default()
            };
            bpf(BPF_MAP_UPDATE_ELEM, &mut update).context("filling the shim's program array")?;
            programs.push(program);
        }
        Ok(Self {
            programs,
            _array: array,
        })
    }

    /// BPF_PROG_TEST_RUN of the shim in front of `targets[slot]`: the verdict and
    /// frame the target left, and the kernel's time per run (shim included).
    pub fn run(&self, slot: usize, frame: &[u8], repeat: u32) -> Result<(RunResult, Duration)> {
        let mut out = vec![0u8; frame.len() + 256];
        let run = ferrite_agent::bpf_syscall::test_run_into(
            self.programs[slot].as_fd(),
            frame,
            &mut out,
            repeat,
        )
        .context("test run of the tunnel shim")?;
        out.truncate(run.data_size_out as usize);
        Ok((
            RunResult {
                verdict: run.retval,
                frame: out,
            },
            Duration::from_nanos(run.duration_ns as u64),
        ))
    }
}
