//! `ferrite-cni`: the CNI plugin binary (CNI spec 1.1.0). The runtime passes the
//! command in the environment and the network configuration on stdin; the result
//! or error goes to stdout as JSON.
use std::io::Read;

use anyhow::Context;
use ferrite_agent::cni::{
    self,
    spec::{code, Environment, OrCode},
};

fn main() {
    let outcome = Environment::parse(|name| std::env::var(name).ok()).and_then(|env| {
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .context("reading stdin")
            .or_code(code::IO_FAILURE, "cannot read the network configuration")?;
        cni::run(&env, &input)
    });
    let exit_code = match outcome {
        Ok(Some(output)) => {
            println!("{output}");
            0
        }
        Ok(None) => 0,
        Err(error) => {
            println!(
                "{}",
                serde_json::to_string(&error).unwrap_or_else(|_| error.msg.clone())
            );
            1
        }
    };
    std::process::exit(exit_code);
}
