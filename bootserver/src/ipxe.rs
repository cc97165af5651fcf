//! The per-machine iPXE script, rendered from typed data. Its kernel line carries the agent's
//! settings rendered by [`BootConfig::render`], which the agent parses back.

use diskcast_proto::cmdline::BootConfig;

#[derive(Debug, Clone)]
pub struct BootScript {
    /// `http://server:port` without a trailing slash.
    pub base_url: String,
    pub mac: String,
    /// Extra kernel parameters from the config (console and the like).
    pub kernel_args: String,
    pub agent: BootConfig,
}

/// The name the initramfs gets inside iPXE; Debian 12's iPXE under EFI needs `initrd=` to match it.
pub const INITRD_NAME: &str = "initramfs.img";

impl BootScript {
    pub fn kernel_command_line(&self) -> String {
        let mut words = vec![format!("initrd={INITRD_NAME}")];
        words.extend(
            self.kernel_args
                .split_ascii_whitespace()
                .map(str::to_string),
        );
        words.push(self.agent.render());
        words.join(" ")
    }

    pub fn render(&self) -> String {
        let base = &self.base_url;
        format!(
            "#!ipxe\n\
             echo diskcast: booting {mac} as {role}\n\
             :retry\n\
             kernel {base}/boot/vmlinuz {cmdline} || goto failed\n\
             initrd --name {INITRD_NAME} {base}/boot/{INITRD_NAME} || goto failed\n\
             boot || goto failed\n\
             :failed\n\
             echo diskcast: loading the agent failed; retrying in 5 seconds\n\
             sleep 5\n\
             goto retry\n",
            mac = self.mac,
            role = self.agent.role,
            cmdline = self.kernel_command_line(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diskcast_proto::cmdline::{Finish, Role};
    use std::net::Ipv4Addr;

    #[test]
    fn script_kernel_line_parses_back_to_the_same_agent_settings() {
        let agent = BootConfig {
            role: Role::Slave,
            server: Some(Ipv4Addr::new(10, 77, 0, 1)),
            on_error: Finish::Poweroff,
            // The HTTPS contract travels too: port and pin.
            https: Some(diskcast_proto::cmdline::HttpsApi {
                port: 8443,
                pin: diskcast_proto::trust::CertFingerprint([0x5a; 32]),
            }),
            ..BootConfig::default()
        };
        let script = BootScript {
            base_url: "http://10.77.0.1:8080".into(),
            mac: "52:54:00:00:00:01".into(),
            kernel_args: "console=ttyS0,115200".into(),
            agent: agent.clone(),
        };
        let text = script.render();
        assert!(text.starts_with("#!ipxe\n"));
        let kernel_line = text.lines().find(|l| l.starts_with("kernel ")).unwrap();
        assert!(kernel_line.contains(
            "http://10.77.0.1:8080/boot/vmlinuz initrd=initramfs.img console=ttyS0,115200"
        ));
        let cmdline = kernel_line
            .split_once("vmlinuz ")
            .unwrap()
            .1
            .trim_end_matches(" || goto failed");
        assert_eq!(BootConfig::parse(cmdline), Ok(agent));
        assert!(
            text.contains("initrd --name initramfs.img http://10.77.0.1:8080/boot/initramfs.img")
        );
    }
}
