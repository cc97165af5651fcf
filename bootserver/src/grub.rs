//! The Secure Boot chain's GRUB side: the names the chain asks for over TFTP and the
//! configuration files each machine's signed GRUB reads, rendered from typed data.
//!
//! The chain: UEFI PXE firmware → `shimx64.efi` (Microsoft-signed, Debian's shim-signed) →
//! `grubx64.efi` from the same TFTP directory (Debian-signed `grubnetx64.efi`, its prefix built
//! in as `/grub`) → `/grub/grub.cfg` ([`ROOT_CONFIG`]) → `/grub/grub.cfg-MAC` (per machine:
//! the agent, or its local disk) → the Debian-signed kernel and the initramfs, over TFTP (Debian
//! 12's signed GRUB refuses `insmod http` under Secure Boot). shim and GRUB verify GRUB and the
//! kernel; the configs, the command line and the initramfs are not verified.

use crate::config::LocalBoot;
use diskcast_proto::cmdline::BootConfig;

/// What shim fetches after itself (its default second stage, from its own directory).
pub const GRUB_FILE: &str = "grubx64.efi";
/// What the signed GRUB reads first: its built-in prefix is `/grub`.
pub const ROOT_CONFIG: &str = "grub/grub.cfg";
/// Per machine: `grub/grub.cfg-52:54:00:12:34:56` (GRUB's `$net_default_mac`).
pub const MACHINE_CONFIG_PREFIX: &str = "grub/grub.cfg-";
/// The kernel and initramfs as the signed chain fetches them.
pub const KERNEL_FILE: &str = "diskcast/vmlinuz";
pub const INITRD_FILE: &str = "diskcast/initramfs.img";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrubError {
    #[error(
        "kernel parameter {word:?} cannot pass through GRUB unchanged (GRUB escapes quotes and \
         backslashes on the kernel command line): remove `'`, `\"` and `\\` from the value"
    )]
    Unquotable { word: String },
}

/// `grub/grub.cfg`: hands every machine to its own file.
pub const ROOT_CONFIG_TEXT: &str = "\
# diskcast: every machine reads its own grub.cfg-MAC beside this file.
set timeout=0
if [ -n \"$net_default_mac\" ]; then
  source \"$prefix/grub.cfg-$net_default_mac\"
fi
echo \"diskcast: GRUB does not know this machine's MAC address (net_default_mac is empty)\"
sleep 30
reboot
";

/// One word for GRUB's `linux` line: single-quoted, so GRUB expands nothing in it.
fn grub_word(word: &str) -> Result<String, GrubError> {
    if word.contains(['\'', '"', '\\']) {
        return Err(GrubError::Unquotable { word: word.into() });
    }
    Ok(format!("'{word}'"))
}

/// A message for `echo`, with what GRUB would treat specially left out.
fn grub_text(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter(|c| !matches!(c, '\'' | '\\') && !c.is_control())
        .collect();
    format!("'{clean}'")
}

/// The agent's kernel command line without iPXE's `initrd=`: the config's parameters, then the
/// agent's settings.
pub fn kernel_words(kernel_args: &str, agent: &BootConfig) -> Vec<String> {
    let mut words: Vec<String> = kernel_args
        .split_ascii_whitespace()
        .map(str::to_string)
        .collect();
    words.extend(agent.render().split_ascii_whitespace().map(str::to_string));
    words
}

/// The machine's GRUB config that boots the agent with `agent`'s settings.
pub fn agent_config(mac: &str, kernel_args: &str, agent: &BootConfig) -> Result<String, GrubError> {
    let words = kernel_words(kernel_args, agent)
        .iter()
        .map(|w| grub_word(w))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(format!(
        "# diskcast: {mac} boots the agent ({role}) through the signed chain\n\
         echo {banner}\n\
         if linux /{KERNEL_FILE} {cmdline}; then\n\
         \x20 if initrd /{INITRD_FILE}; then\n\
         \x20   boot\n\
         \x20 fi\n\
         fi\n\
         echo 'diskcast: loading the agent failed; restarting in 10 seconds'\n\
         sleep 10\n\
         reboot\n",
        role = agent.role,
        banner = grub_text(&format!("diskcast: booting {mac} as {}", agent.role)),
        cmdline = words.join(" "),
    ))
}

/// Loaders tried on the local disk, in order (as `scripts/make-localboot-efi` does).
const LOCAL_LOADERS: [&str; 5] = [
    "/EFI/BOOT/BOOTX64.EFI",
    "/EFI/Microsoft/Boot/bootmgfw.efi",
    "/EFI/debian/shimx64.efi",
    "/EFI/ubuntu/shimx64.efi",
    "/EFI/fedora/shimx64.efi",
];

/// The machine's GRUB config that boots its local disk: the first EFI loader found on a local
/// partition (firmware verifies it: under Secure Boot it must be signed by a key in db), or
/// with [`LocalBoot::Exit`] back to the firmware's next boot option.
pub fn local_config(mac: &str, why: &str, method: LocalBoot) -> String {
    let head = format!(
        "# diskcast: {mac} boots its local disk\necho {}\n",
        grub_text(&format!("diskcast: {why}: booting its local disk"))
    );
    if method == LocalBoot::Exit {
        return head + "exit 1\n";
    }
    format!(
        "{head}\
         for loader in {loaders}; do\n\
         \x20 if search --no-floppy --file --set=root \"$loader\"; then\n\
         \x20   echo \"diskcast: starting ($root)$loader\"\n\
         \x20   chainloader \"$loader\"\n\
         \x20   boot\n\
         \x20   echo \"diskcast: ($root)$loader did not start\"\n\
         \x20 fi\n\
         done\n\
         echo 'diskcast: no local operating system found'\n\
         sleep 30\n\
         exit 1\n",
        loaders = LOCAL_LOADERS.join(" "),
    )
}

/// A config that only says why this machine cannot boot (and tries again later).
pub fn error_config(mac: &str, why: &str) -> String {
    format!(
        "# diskcast: {mac} cannot boot\necho {}\nsleep 30\nreboot\n",
        grub_text(&format!("diskcast: {why}"))
    )
}

/// The MAC a per-machine config name is for: `grub/grub.cfg-52:54:00:12:34:56`.
pub fn machine_config_mac(name: &str) -> Option<diskcast_proto::mac::MacAddr> {
    name.trim_start_matches('/')
        .strip_prefix(MACHINE_CONFIG_PREFIX)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskcast_proto::cmdline::{Finish, Role, TaskRef};
    use std::net::Ipv4Addr;

    /// GRUB's own reading of a single-quoted word list (what `linux` receives as arguments).
    fn unquote(words: &str) -> Vec<String> {
        words
            .split_ascii_whitespace()
            .map(|w| {
                w.strip_prefix('\'')
                    .and_then(|w| w.strip_suffix('\''))
                    .expect("single-quoted")
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn the_linux_line_carries_the_agent_settings_back_unchanged() {
        let agent = BootConfig {
            role: Role::Slave,
            server: Some(Ipv4Addr::new(10, 77, 0, 1)),
            on_error: Finish::Poweroff,
            task: Some(TaskRef {
                id: 7,
                token: "ab".repeat(32),
            }),
            // The HTTPS contract travels too: port and pin.
            https: Some(diskcast_proto::cmdline::HttpsApi {
                port: 8443,
                pin: diskcast_proto::trust::CertFingerprint([0x5a; 32]),
            }),
            ..BootConfig::default()
        };
        let text =
            agent_config("52:54:00:00:00:01", "console=ttyS0,115200 panic=-1", &agent).unwrap();
        let linux = text
            .lines()
            .find(|l| l.starts_with("if linux "))
            .unwrap()
            .strip_prefix("if linux /diskcast/vmlinuz ")
            .unwrap()
            .strip_suffix("; then")
            .unwrap();
        let words = unquote(linux);
        assert_eq!(&words[..2], ["console=ttyS0,115200", "panic=-1"]);
        assert!(!words.iter().any(|w| w.starts_with("initrd=")));
        assert_eq!(BootConfig::parse(&words.join(" ")), Ok(agent));
        assert!(text.contains("initrd /diskcast/initramfs.img"));
        // `$` stays literal inside single quotes: nothing in a value is expanded by GRUB.
        assert_eq!(
            grub_word("diskcast.disk=serial:A$B"),
            Ok("'diskcast.disk=serial:A$B'".into())
        );
        assert!(matches!(
            grub_word("diskcast.disk=serial:A\"B"),
            Err(GrubError::Unquotable { .. })
        ));
    }

    #[test]
    fn machine_configs_are_found_by_mac_and_local_boot_honours_the_method() {
        assert_eq!(
            machine_config_mac("/grub/grub.cfg-52:54:00:dc:00:01").map(|m| m.to_string()),
            Some("52:54:00:dc:00:01".into())
        );
        assert_eq!(machine_config_mac("grub/grub.cfg"), None);
        assert_eq!(machine_config_mac("grub/grub.cfg-nonsense"), None);
        let local = local_config(
            "52:54:00:dc:00:01",
            "no task for this machine",
            LocalBoot::Grub,
        );
        assert!(local.contains("chainloader \"$loader\""), "{local}");
        assert!(local.contains("/EFI/Microsoft/Boot/bootmgfw.efi"));
        let exit = local_config("52:54:00:dc:00:01", "no task", LocalBoot::Exit);
        assert!(exit.ends_with("exit 1\n") && !exit.contains("chainloader"));
        assert!(ROOT_CONFIG_TEXT.contains("source \"$prefix/grub.cfg-$net_default_mac\""));
        assert_eq!(grub_text("it's a \\ test"), "'its a  test'");
    }
}
