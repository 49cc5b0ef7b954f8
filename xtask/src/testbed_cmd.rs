//! `./x testbed up|down|status`: the two-host testbed of the demo, by hand (see docs/testbed.md).

use anyhow::{Context, Result};
use testbed::topology::{Host, Topology};

#[derive(clap::Args, Debug)]
pub struct TestbedArgs {
    #[command(subcommand)]
    action: Action,
    /// Name prefix of the testbed's namespaces (several testbeds with different prefixes can coexist).
    #[arg(long, default_value = "mm", global = true)]
    prefix: String,
}

#[derive(clap::Subcommand, Debug)]
enum Action {
    /// Create the namespaces, bridges, taps and links (does nothing if they are already there).
    Up,
    /// Remove everything with the prefix, ending processes still running inside (also after a crash).
    Down,
    /// Show the namespaces, addresses, bridge FDBs and processes.
    Status,
}

pub fn run(args: &TestbedArgs) -> Result<()> {
    let topo = Topology::new(&args.prefix)?;
    match args.action {
        Action::Up => {
            crate::util::require_root("the testbed (network namespaces)")?;
            let was_up = topo.is_up();
            topo.up()
                .context("the testbed did not come up; `./x testbed down` removes what is left")?;
            if was_up {
                eprintln!("testbed {} is already up", topo.prefix);
            }
            print!("{}", topo.status());
            println!(
                "\nrun a VM on host A:  ip netns exec {} target/release/migrator run --tap tap-a --mac 52:54:00:de:e0:01 \
                 --ip {}/{}\nwatch every port:    target/release/migmon watch {}",
                topo.host_ns(Host::A),
                topo.vm_ip(0),
                topo.lan_prefix_len(),
                topo.ports()
                    .iter()
                    .map(|p| format!("--iface {p}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        Action::Down => {
            crate::util::require_root("the testbed (network namespaces)")?;
            let removed = topo.down()?;
            if removed.is_empty() {
                eprintln!("testbed {}: nothing to remove", topo.prefix);
            } else {
                eprintln!("testbed {}: removed {}", topo.prefix, removed.join(", "));
            }
        }
        Action::Status => print!("{}", topo.status()),
    }
    Ok(())
}
