//! `ferrite-cni`: the CNI plugin binary (CNI spec 1.1.0).
fn main() {
    std::process::exit(ferrite_agent::cni::main());
}
