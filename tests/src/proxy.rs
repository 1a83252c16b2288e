//! A TCP proxy in front of a real server that a test can cut (connections refused at once) or
//! stall (accepted, never answered), to show a provider's behaviour in a real outage.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Close every connection at once (a server that is down).
    Refuse,
    /// Hold every connection open and forward nothing (a server that hangs).
    Stall,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Tests drop the proxy on an async thread, where a runtime must not block to shut down.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Proxy {
    /// Listen on a free loopback port and forward to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("proxy runtime");
        // Bound here, synchronously: the caller may be on an async thread, where no runtime
        // may block.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy port");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let (mode, watcher) = watch::channel(Mode::Pass);
        let upstream = upstream.to_owned();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("proxy listener");
            while let Ok((client, _)) = listener.accept().await {
                let watcher = watcher.clone();
                let upstream = upstream.clone();
                tokio::spawn(serve(client, upstream, watcher));
            }
        });
        Proxy {
            addr,
            mode,
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switch modes. Open connections are closed, so pooled clients see the change at once.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

async fn serve(mut client: TcpStream, upstream: String, mut watcher: watch::Receiver<Mode>) {
    let mode = *watcher.borrow_and_update();
    match mode {
        Mode::Refuse => {}
        Mode::Stall => {
            // Hold the connection until the mode changes, then drop it.
            let _ = watcher.changed().await;
        }
        Mode::Pass => {
            let Ok(mut server) = TcpStream::connect(&upstream).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = watcher.changed() => {}
            }
        }
    }
}

/// `host:port` of an `http://host:port[/...]` URL.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}
