//! `aoe-interfaces [-c] [IF ...]`: shows or sets the interfaces the initiator may use
//! (the kernel driver's `aoe_iflist`; here `ROOT/interfaces`).
//!
//! As aoetools' script: no arguments shows the list (an empty line: every interface is
//! allowed), `-c` clears it, names replace it after each is checked to be a network
//! interface (`"X" is not a network interface`, exit 1). The check asks the kernel in the
//! caller's network namespace (aoetools tests `/sys/class/net/X`, which shows the namespace
//! sysfs was mounted in).

use anyhow::Result;
use clap::Args;

use super::{json_str, RootArg};

/// Show or set the interfaces the initiator may use (empty: all).
#[derive(Debug, Args)]
pub struct InterfacesArgs {
    #[command(flatten)]
    root: RootArg,
    /// Clear the list: allow every interface.
    #[arg(short = 'c', conflicts_with = "interfaces")]
    clear: bool,
    /// With no interfaces: print the list as JSON.
    #[arg(long, conflicts_with_all = ["clear", "interfaces"])]
    json: bool,
    /// Interfaces to allow (replacing the list).
    #[arg(value_name = "IF")]
    interfaces: Vec<String>,
}

/// Runs `aoe-interfaces`.
pub fn run(a: InterfacesArgs) -> Result<()> {
    let root = a.root.open()?;
    if a.clear {
        return root.control("interfaces", "\n");
    }
    if a.interfaces.is_empty() {
        let path = root.file("interfaces");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let list: Vec<&str> = text.split_whitespace().collect();
        if a.json {
            println!(
                "{{\"interfaces\":[{}],\"all\":{}}}",
                list.iter()
                    .map(|s| json_str(s))
                    .collect::<Vec<_>>()
                    .join(","),
                list.is_empty()
            );
        } else {
            // The kernel's parameter reads back as the string and a newline.
            println!("{}", list.join(" "));
        }
        return Ok(());
    }
    let bad: Vec<&String> = a
        .interfaces
        .iter()
        .filter(|i| aoe_sys::interface_info(i).is_err())
        .collect();
    for i in &bad {
        eprintln!("aoe-interfaces Error: \"{i}\" is not a network interface");
    }
    if !bad.is_empty() {
        // Said above, once per name, as aoetools' script says it.
        super::exit_quietly(1);
    }
    root.control("interfaces", &format!("{}\n", a.interfaces.join(" ")))
}
