//! Deploy: multicast a stored image to slaves with the same protocol a peer master uses. The
//! stored chunks travel as they are (zstd frames stay compressed); slaves decompress and check.

use crate::store::{ImageSummary, Store, StoreError};
use diskcast_proto::sender::Sender;
use diskcast_transport::send::{self, SendError, SendOptions, SendSummary};

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
    // Signature and every chunk checked before a slave hears of it: a changed or unsigned
    // image is never sent.
    let mut image = store.open_trusted(name)?;
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
