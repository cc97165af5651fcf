//! What the bootserver serves over TFTP: the signed chain's files under fixed names (shim,
//! GRUB, the root and per-machine GRUB configs, the kernel and initramfs), everything else from
//! the TFTP root (the iPXE loaders). The per-machine config is decided when GRUB asks for it,
//! like an iPXE script.

use crate::grub;
use crate::lab::Lab;
use crate::tftp::{read_capped, ConfinedDir, FileSource, TftpError};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug)]
pub struct BootFiles {
    lab: Arc<Lab>,
    root: ConfinedDir,
}

impl BootFiles {
    pub fn new(lab: Arc<Lab>, root: ConfinedDir) -> Self {
        Self { lab, root }
    }
}

fn generated(text: String, name: &str, max: u64) -> Result<Arc<[u8]>, TftpError> {
    let len = text.len() as u64;
    if len > max {
        return Err(TftpError::TooLarge {
            name: name.into(),
            len,
            max,
        });
    }
    Ok(Arc::from(text.into_bytes()))
}

impl FileSource for BootFiles {
    fn read(&self, name: &str, client: IpAddr, max: u64) -> Result<Arc<[u8]>, TftpError> {
        let relative = name.trim_start_matches('/');
        let boot = &self.lab.config.boot;
        let file = |path: &Path| read_capped(path, name, max);
        match relative {
            crate::dhcp_server::SHIM_BOOT_FILE => file(&boot.shim),
            grub::GRUB_FILE => file(&boot.grub_net),
            grub::KERNEL_FILE => file(&boot.kernel),
            grub::INITRD_FILE => file(&boot.initramfs),
            grub::ROOT_CONFIG => generated(grub::ROOT_CONFIG_TEXT.into(), name, max),
            _ => match grub::machine_config_mac(relative) {
                Some(mac) => {
                    let text = self
                        .lab
                        .grub_config(mac, crate::unix_now())
                        .unwrap_or_else(|e| {
                            let why = diskcast_proto::error_chain(&e);
                            log::error!("lab: no GRUB config for {mac} (asked by {client}): {why}");
                            grub::error_config(
                                &mac.to_string(),
                                "the server could not decide what this machine boots; its log says why",
                            )
                        });
                    generated(text, name, max)
                }
                None => self.root.read(name, client, max),
            },
        }
    }
}
