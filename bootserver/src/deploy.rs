//! Deploy: multicast a stored image to slaves with the same protocol a peer master uses. The
//! stored chunks travel as they are (zstd frames stay compressed); slaves decompress and check.

use crate::store::{ImageSummary, Store, StoreError};
use diskcast_proto::sender::Sender;
use diskcast_transport::present;
use diskcast_transport::send::{self, SendError, SendOptions, SendSummary};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("deploying image {name:?}")]
    Session {
        name: String,
        #[source]
        source: SendError,
    },
}

/// One session: waits for slaves per the start policy, sends, returns the summary.
pub fn deploy_once(
    store: &Store,
    name: &str,
    opts: &SendOptions,
    progress: impl FnMut(&Sender),
) -> Result<SendSummary, DeployError> {
    let mut image = store.open_image(name)?;
    let manifest = image.manifest.clone();
    log::info!(
        "deploying image {name:?}: {}",
        ImageSummary::of(name, &image).sizes()
    );
    let session_err = |source| DeployError::Session {
        name: name.into(),
        source,
    };
    send::multicast(opts, manifest, &mut image, progress).map_err(session_err)
}

/// `[deploy]` in the server: session after session, so machines booted later are served too.
pub fn deploy_forever(store: Store, name: String, opts: SendOptions) {
    let mut told = false;
    loop {
        if let Err(StoreError::NotFound { .. }) = store.open_image(&name) {
            // A capture may be on its way: deploy once it is stored.
            if !told {
                log::info!("deploy: waiting for image {name:?} to appear in the store");
                told = true;
            }
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        told = false;
        // The server log gets the table every few seconds, and not at all while nobody joined.
        let mut last = std::time::Instant::now();
        match deploy_once(&store, &name, &opts, |progress| {
            if progress.receivers().count() == 0 || last.elapsed() < Duration::from_secs(5) {
                return;
            }
            last = std::time::Instant::now();
            log::info!("deploying {name}:");
            for line in present::progress_table(progress, std::time::Instant::now()) {
                log::info!("{line}");
            }
        }) {
            Ok(summary) if summary.result().is_err() && summary.receivers.is_empty() => {}
            Ok(summary) => {
                for line in summary.render().lines() {
                    log::info!("deploy {name}: {line}");
                }
            }
            Err(e) => {
                log::error!("deploy {name}: {}", diskcast_proto::error_chain(&e));
                std::thread::sleep(Duration::from_secs(5));
            }
        }
    }
}
