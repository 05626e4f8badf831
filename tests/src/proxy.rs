//! The transparent proxy (`membrane-l7proxy`) serving in a node namespace on its own thread
//! and runtime, so its listeners and upstream sockets are created there; for the
//! end-to-end suites that send real traffic through the datapath's redirect.

use std::{sync::Arc, thread::JoinHandle, time::Duration};

use membrane_datapath::Netns;
use membrane_l7proxy::redirect::{
    IdentitySource, PolicySource, TransparentConfig, TransparentProxy,
};
use tokio::sync::oneshot;

/// Bound of the wait for the proxy to start (not a timing assertion).
const START: Duration = Duration::from_secs(10);

/// Stopped and joined on drop.
pub struct RunningProxy {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RunningProxy {
    /// Binds `config`'s listeners inside `node` and serves until dropped; panics (with the
    /// reason) if the proxy does not start.
    pub fn start(
        node: &Netns,
        config: TransparentConfig,
        policies: Arc<dyn PolicySource>,
        identities: Arc<dyn IdentitySource>,
    ) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel::<Result<(), String>>();
        let node = node.clone();
        let thread = std::thread::spawn(move || {
            let ran = node.run(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("tokio runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match TransparentProxy::bind(config, policies, identities) {
                        Ok(proxy) => {
                            let _ = ready_tx.send(Ok(()));
                            proxy
                                .serve(async move {
                                    let _ = stopped.await;
                                })
                                .await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                        }
                    }
                });
            });
            if let Err(e) = ran {
                eprintln!("proxy thread could not enter the node namespace: {e}");
            }
        });
        match ready.recv_timeout(START) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("start the transparent proxy in the node namespace: {e}"),
            Err(e) => panic!("the transparent proxy did not start: {e}"),
        }
        Self {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl RunningProxy {
    /// Stops the proxy (its listeners close: the datapath finds no socket) and waits for it.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
