//! `ferrite-cni`: the CNI plugin binary (CNI spec 1.1.0). The runtime passes the
//! command in the environment and the network configuration on stdin; the result
//! or error goes to stdout as JSON.
use ferrite_agent::cni::{
    self,
    spec::{read_input, Environment},
};

fn main() {
    let outcome = Environment::parse(|name| std::env::var(name).ok()).and_then(|env| {
        let input = read_input(std::io::stdin().lock())?;
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
