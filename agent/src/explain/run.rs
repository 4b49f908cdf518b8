//! Explain runs of a node's programs (BPF_PROG_TEST_RUN of their pinned explain
//! copies, loaded with them): the packet marked with the run's word
//! (`ferrite_common::explain`), the trace its CPU's slot of `ferrite_trace` holds
//! afterwards. The calling thread stays on one CPU, so the slot
//! read is the one the run wrote; the nonce tells another explain run's trace apart.
use std::path::Path;

use anyhow::{bail, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use ferrite_common::{
    explain::{self, SockRequest},
    map_names, program_names, ExplainTrace,
};

/// Tries before giving up when another explain run keeps overwriting the trace.
const TRIES: usize = 5;
/// Room for what a program may add to a frame (an ICMP error is longer than a SYN).
const HEADROOM: usize = 256;

/// What one explain run of a program did.
pub struct Traced {
    pub trace: ExplainTrace,
    /// The program's return code (TC_ACT_*, XDP_*).
    pub return_value: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
}

/// Where the packet enters a TC program.
pub struct TcContext {
    /// The device it arrives on (its ifindex in the caller's network namespace).
    pub ifindex: u32,
    /// The control block: for the overlay program, the tunnel key (VNI, remote).
    pub cb: [u32; 5],
}

/// Keeps the calling thread on the CPU it runs on (per-CPU trace slots).
pub struct OneCpu {
    cpu: usize,
}

impl OneCpu {
    /// The CPU the thread stays on.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    pub fn pin() -> Result<Self> {
        use nix::sched::{sched_getcpu, sched_setaffinity, CpuSet};
        let cpu = sched_getcpu().context("sched_getcpu")?;
        let mut set = CpuSet::new();
        set.set(cpu).context("CPU set")?;
        sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).context("sched_setaffinity")?;
        Ok(Self { cpu })
    }
}

/// A nonce that differs between runs (and processes).
fn nonce(attempt: usize) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ std::process::id().rotate_left(8) ^ attempt as u32) & !explain::MAGIC_MASK
}

/// The explain copy of the program `program`.
pub fn explain_copy(program: &str) -> Result<&'static str> {
    program_names::EXPLAIN
        .iter()
        .find(|(explained, _)| *explained == program)
        .map(|(_, copy)| *copy)
        .with_context(|| format!("{program} has no explain copy"))
}

/// The `__sk_buff` a test run starts from, up to and with `cb`: only `mark`,
/// `ifindex` and `cb` set (the kernel refuses the fields it does not take).
pub fn skb_context(word: u32, context: &TcContext) -> [u8; 68] {
    const MARK: usize = 8;
    const IFINDEX: usize = 40;
    const CB: usize = 48;
    let mut skb = [0u8; 68];
    skb[MARK..MARK + 4].copy_from_slice(&word.to_ne_bytes());
    skb[IFINDEX..IFINDEX + 4].copy_from_slice(&context.ifindex.to_ne_bytes());
    for (i, value) in context.cb.iter().enumerate() {
        skb[CB + 4 * i..CB + 4 * i + 4].copy_from_slice(&value.to_ne_bytes());
    }
    skb
}

/// The `xdp_md` of a test run whose frame follows `meta_len` bytes of metadata.
pub fn xdp_context(meta_len: usize, total_len: usize, ingress_ifindex: u32) -> [u8; 24] {
    let mut md = [0u8; 24];
    md[0..4].copy_from_slice(&(meta_len as u32).to_ne_bytes()); // data
    md[4..8].copy_from_slice(&(total_len as u32).to_ne_bytes()); // data_end
    md[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    md
}

pub struct Runner<'a> {
    pin_dir: &'a Path,
    cpu: OneCpu,
    trace: PerCpuArray<MapData, ExplainTrace>,
}

impl<'a> Runner<'a> {
    pub fn new(pin_dir: &'a Path) -> Result<Self> {
        let path = pin_dir.join(map_names::TRACE);
        let data = MapData::from_pin(&path).with_context(|| {
            format!(
                "opening {} (is the node's agent running a datapath with explain support?)",
                path.display()
            )
        })?;
        let trace = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
        Ok(Self {
            pin_dir,
            cpu: OneCpu::pin()?,
            trace,
        })
    }

    fn read_trace(&self, word: u32) -> Result<Option<ExplainTrace>> {
        let values = self.trace.get(&0, 0).context("reading ferrite_trace")?;
        let trace = *values
            .get(self.cpu.cpu)
            .context("no trace slot for this CPU")?;
        Ok((trace.nonce == word & !explain::MAGIC_MASK).then_some(trace))
    }

    /// Run `attempt` (given the run's mark) until the trace it left is its own.
    fn traced(&self, mut attempt: impl FnMut(u32) -> Result<(u32, Vec<u8>)>) -> Result<Traced> {
        for i in 0..TRIES {
            let word = explain::MAGIC | nonce(i);
            let (return_value, frame) = attempt(word)?;
            if let Some(trace) = self.read_trace(word)? {
                return Ok(Traced {
                    trace,
                    return_value,
                    frame,
                });
            }
        }
        bail!("the trace was overwritten {TRIES} times in a row (other explain runs on this CPU?)")
    }

    fn tc_program(&self, name: &str) -> Result<SchedClassifier> {
        let path = self.pin_dir.join(name);
        SchedClassifier::from_pin(&path)
            .with_context(|| format!("opening the pinned program {}", path.display()))
    }

    /// Run the explain copy of the TC program `program` on `frame` entering as
    /// `context` says.
    pub fn tc(&self, program: &str, frame: &[u8], context: &TcContext) -> Result<Traced> {
        let name = explain_copy(program)?;
        let program = self.tc_program(name)?;
        self.traced(|word| {
            let ctx = skb_context(word, context);
            let mut out = vec![0u8; frame.len() + HEADROOM];
            let result = program
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::default()
                })
                .with_context(|| format!("test run of {name}"))?;
            out.truncate(result.data_size_out as usize);
            Ok((result.return_value, out))
        })
    }

    /// Run the pinned XDP program on `frame` arriving on `ingress_ifindex` (`None`:
    /// the test run's default device, for a device without XDP receive queues).
    pub fn xdp(&self, frame: &[u8], ingress_ifindex: Option<u32>) -> Result<Traced> {
        let path = self.pin_dir.join(program_names::EXPLAIN_WORLD);
        let program = Xdp::from_pin(&path, aya_obj::programs::XdpAttachType::Interface)
            .with_context(|| format!("opening the pinned program {}", path.display()))?;
        let meta_len = explain::XDP_METADATA_LEN;
        self.traced(|word| {
            let mut data = word.to_ne_bytes().to_vec();
            data.extend_from_slice(frame);
            let ctx = xdp_context(meta_len, data.len(), ingress_ifindex.unwrap_or(0));
            let mut out = vec![0u8; data.len() + HEADROOM];
            let result = program
                .test_run(TestRunOptions {
                    data_in: Some(&data),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::default()
                })
                .context("test run of ferrite_explain_world")?;
            out.truncate(result.data_size_out as usize);
            // The frame follows the metadata it came with.
            let frame = out.get(meta_len..).unwrap_or_default().to_vec();
            Ok((result.return_value, frame))
        })
    }

    /// Run the socket-level selection on `request` (its `word` is set here).
    pub fn socket(&self, request: SockRequest) -> Result<Traced> {
        let program = self.tc_program(program_names::EXPLAIN_SOCK)?;
        self.traced(|word| {
            let request = SockRequest { word, ..request };
            // SAFETY: a #[repr(C)] value of integers without implicit padding.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&request as *const SockRequest).cast::<u8>(),
                    std::mem::size_of::<SockRequest>(),
                )
            };
            let mut out = vec![0u8; bytes.len()];
            let result = program
                .test_run(TestRunOptions {
                    data_in: Some(bytes),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .context("test run of ferrite_explain_sock")?;
            Ok((result.return_value, Vec::new()))
        })
    }
}
