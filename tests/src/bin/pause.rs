//! `ferrite-pause`: the pod sandbox's process for the image's end-to-end test (what
//! registry.k8s.io/pause is to kubelet, which the test cannot pull): it holds the
//! sandbox's namespaces, reaps orphans, and exits on SIGTERM or SIGINT.
use nix::sys::{
    signal::{SigSet, Signal},
    wait::{waitpid, WaitPidFlag},
};

fn main() {
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        signals.add(signal);
    }
    signals.thread_block().expect("blocking signals");
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if status == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(_) => {}
        }
    }
}
