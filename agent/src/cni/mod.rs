//! The CNI plugin (`ferrite-cni`): wires pods the way the datapath expects.

/// Entry point of the `ferrite-cni` binary; returns the process exit code.
pub fn main() -> i32 {
    eprintln!("ferrite-cni: not implemented yet");
    1
}
