//! TCP (stream) filters: the proxy-wasm stream context, for connections the proxy relays at
//! L4 (membrane's TCP mode, the TLS relay). Same style as the HTTP API: typed callbacks
//! returning `Result`, errors answered by [`ConnectionFilter::on_error`] (default: close the
//! connection) instead of trapping the instance.
//!
//! ```text
//!  instance start ─ TcpFilter::configure(config bytes)
//!  each connection:
//!    TcpFilter::new_connection(&self)                     a ConnectionFilter for it
//!    ConnectionFilter::on_new_connection(conn)            before any byte
//!    ConnectionFilter::on_downstream_data(conn, size, eos)  client → server, chain order
//!    ConnectionFilter::on_upstream_data(conn, size, eos)    server → client, reverse order
//!        Continue ⇒ the bytes (as left in the buffer) go on
//!        Pause    ⇒ the bytes stay buffered; the next call sees them plus the new ones
//!        Close    ⇒ the connection is closed
//!    ConnectionFilter::on_downstream_close / on_upstream_close(conn, peer)
//!    ConnectionFilter::on_log()                           once, at the end
//! ```
//!
//! Register with [`crate::register_tcp!`]; a module registers either an HTTP filter or a TCP
//! one (its exports then declare only that context type).

use crate::{
    BUFFER_DOWNSTREAM_DATA, BUFFER_UPSTREAM_DATA, Error, check, get_buffer, hostcalls, set_buffer,
};

/// What a connection callback asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpAction {
    Continue,
    Pause,
    Close,
}

/// Who closed a side of the connection (`proxy_peer_type_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Unknown,
    /// The proxy closed it.
    Local,
    /// The peer closed it.
    Remote,
}

impl Peer {
    fn from_abi(v: u32) -> Peer {
        match v {
            1 => Peer::Local,
            2 => Peer::Remote,
            _ => Peer::Unknown,
        }
    }
}

/// The current connection's data, valid inside a callback.
#[derive(Debug)]
pub struct Connection {
    _private: (),
}

impl Connection {
    pub(crate) const fn new() -> Connection {
        Connection { _private: () }
    }

    /// Client bytes held for this filter (all of them in `on_downstream_data`).
    pub fn downstream_data(&self) -> Result<Vec<u8>, Error> {
        get_buffer(BUFFER_DOWNSTREAM_DATA, 0, usize::MAX)
    }

    /// Replaces every client byte held for this filter.
    pub fn set_downstream_data(&self, data: &[u8]) -> Result<(), Error> {
        set_buffer(BUFFER_DOWNSTREAM_DATA, 0, usize::MAX, data)
    }

    /// Server bytes held for this filter (all of them in `on_upstream_data`).
    pub fn upstream_data(&self) -> Result<Vec<u8>, Error> {
        get_buffer(BUFFER_UPSTREAM_DATA, 0, usize::MAX)
    }

    /// Replaces every server byte held for this filter.
    pub fn set_upstream_data(&self, data: &[u8]) -> Result<(), Error> {
        set_buffer(BUFFER_UPSTREAM_DATA, 0, usize::MAX, data)
    }

    /// Inserts bytes before the held server bytes.
    pub fn prepend_upstream_data(&self, data: &[u8]) -> Result<(), Error> {
        set_buffer(BUFFER_UPSTREAM_DATA, 0, 0, data)
    }

    /// Inserts bytes before the held client bytes.
    pub fn prepend_downstream_data(&self, data: &[u8]) -> Result<(), Error> {
        set_buffer(BUFFER_DOWNSTREAM_DATA, 0, 0, data)
    }

    /// The client's `ip:port` (property `source.address`).
    pub fn source_address(&self) -> Result<Option<String>, Error> {
        crate::source_address()
    }

    /// The server's `ip:port` (property `destination.address`).
    pub fn destination_address(&self) -> Result<Option<String>, Error> {
        crate::destination_address()
    }
}

/// The plugin: built from the configuration once per instance; makes a
/// [`ConnectionFilter`] per connection.
pub trait TcpFilter: Sized + 'static {
    type Connection: ConnectionFilter;

    /// Parses the plugin configuration; an error rejects it.
    fn configure(config: &[u8]) -> Result<Self, Error>;

    fn new_connection(&self) -> Self::Connection;
}

/// Per-connection callbacks. Every method has a default that lets bytes through.
pub trait ConnectionFilter: 'static {
    fn on_new_connection(&mut self, _conn: &Connection) -> Result<TcpAction, Error> {
        Ok(TcpAction::Continue)
    }

    /// `size`: the client bytes held (read them with [`Connection::downstream_data`]).
    fn on_downstream_data(
        &mut self,
        _conn: &Connection,
        _size: usize,
        _end_of_stream: bool,
    ) -> Result<TcpAction, Error> {
        Ok(TcpAction::Continue)
    }

    fn on_upstream_data(
        &mut self,
        _conn: &Connection,
        _size: usize,
        _end_of_stream: bool,
    ) -> Result<TcpAction, Error> {
        Ok(TcpAction::Continue)
    }

    fn on_downstream_close(&mut self, _conn: &Connection, _peer: Peer) {}

    fn on_upstream_close(&mut self, _conn: &Connection, _peer: Peer) {}

    /// Once, when the connection is over.
    fn on_log(&mut self) {}

    /// What to do when a callback returned an error (already logged). Default: close the
    /// connection (fail closed), without losing the instance.
    fn on_error(&mut self, _error: &Error) -> TcpAction {
        TcpAction::Close
    }
}

fn close_downstream() -> Result<(), Error> {
    // SAFETY: plain integer argument (DOWNSTREAM = 2).
    check("proxy_close_stream", unsafe {
        hostcalls::proxy_close_stream(2)
    })
}

#[doc(hidden)]
pub mod dispatch {
    //! Glue between the stream-context callbacks and a [`TcpFilter`]; used by
    //! [`crate::register_tcp!`].

    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::{Connection, ConnectionFilter, Peer, TcpAction, TcpFilter, close_downstream};
    use crate::{BUFFER_PLUGIN_CONFIGURATION, Error, Level, log};

    /// Per-instance state of one TCP filter type.
    pub struct State<F: TcpFilter> {
        roots: HashMap<u32, Option<F>>,
        conns: HashMap<u32, F::Connection>,
    }

    impl<F: TcpFilter> Default for State<F> {
        fn default() -> Self {
            State {
                roots: HashMap::new(),
                conns: HashMap::new(),
            }
        }
    }

    pub fn on_context_create<F: TcpFilter>(state: &RefCell<State<F>>, ctx: u32, parent: u32) {
        let mut s = state.borrow_mut();
        if parent == 0 {
            s.roots.insert(ctx, None);
            return;
        }
        let conn = match s.roots.get(&parent) {
            Some(Some(root)) => root.new_connection(),
            _ => {
                log(
                    Level::Error,
                    &format!("context {ctx}: root context {parent} is not configured"),
                );
                return;
            }
        };
        s.conns.insert(ctx, conn);
    }

    pub fn on_configure<F: TcpFilter>(state: &RefCell<State<F>>, ctx: u32, size: usize) -> u32 {
        let config = match crate::get_buffer(BUFFER_PLUGIN_CONFIGURATION, 0, size) {
            Ok(c) => c,
            Err(e) => {
                log(Level::Error, &format!("reading the configuration: {e}"));
                return 0;
            }
        };
        match F::configure(&config) {
            Ok(root) => {
                state.borrow_mut().roots.insert(ctx, Some(root));
                1
            }
            Err(e) => {
                log(Level::Error, &format!("configuration rejected: {e}"));
                0
            }
        }
    }

    fn callback<F: TcpFilter>(
        state: &RefCell<State<F>>,
        ctx: u32,
        name: &str,
        run: impl FnOnce(&mut F::Connection, &Connection) -> Result<TcpAction, Error>,
    ) -> u32 {
        let mut s = state.borrow_mut();
        let Some(conn) = s.conns.get_mut(&ctx) else {
            return 0;
        };
        let action = match run(conn, &Connection::new()) {
            Ok(a) => a,
            Err(e) => {
                log(Level::Error, &format!("{name}: {e}"));
                conn.on_error(&e)
            }
        };
        match action {
            TcpAction::Continue => 0,
            TcpAction::Pause => 1,
            TcpAction::Close => {
                if let Err(e) = close_downstream() {
                    log(Level::Error, &format!("{name}: closing: {e}"));
                }
                0
            }
        }
    }

    pub fn on_new_connection<F: TcpFilter>(state: &RefCell<State<F>>, ctx: u32) -> u32 {
        callback(state, ctx, "on_new_connection", |c, conn| {
            c.on_new_connection(conn)
        })
    }

    pub fn on_downstream_data<F: TcpFilter>(
        state: &RefCell<State<F>>,
        ctx: u32,
        size: usize,
        eos: u32,
    ) -> u32 {
        callback(state, ctx, "on_downstream_data", |c, conn| {
            c.on_downstream_data(conn, size, eos != 0)
        })
    }

    pub fn on_upstream_data<F: TcpFilter>(
        state: &RefCell<State<F>>,
        ctx: u32,
        size: usize,
        eos: u32,
    ) -> u32 {
        callback(state, ctx, "on_upstream_data", |c, conn| {
            c.on_upstream_data(conn, size, eos != 0)
        })
    }

    pub fn on_close<F: TcpFilter>(state: &RefCell<State<F>>, ctx: u32, peer: u32, upstream: bool) {
        let mut s = state.borrow_mut();
        if let Some(c) = s.conns.get_mut(&ctx) {
            let peer = Peer::from_abi(peer);
            if upstream {
                c.on_upstream_close(&Connection::new(), peer);
            } else {
                c.on_downstream_close(&Connection::new(), peer);
            }
        }
    }

    pub fn on_log<F: TcpFilter>(state: &RefCell<State<F>>, ctx: u32) {
        if let Some(c) = state.borrow_mut().conns.get_mut(&ctx) {
            c.on_log();
        }
    }

    pub fn on_delete<F: TcpFilter>(state: &RefCell<State<F>>, ctx: u32) {
        let mut s = state.borrow_mut();
        s.conns.remove(&ctx);
        s.roots.remove(&ctx);
    }
}

/// Exports the proxy-wasm ABI v0.2.1 entry points of a TCP (stream) filter for a
/// [`TcpFilter`] type. Use once per crate, instead of [`crate::register!`]:
///
/// ```ignore
/// membrane_filter_sdk::register_tcp!(MyTcpFilter);
/// ```
#[macro_export]
macro_rules! register_tcp {
    ($filter:ty) => {
        const _: () = {
            use ::core::cell::RefCell;
            use $crate::__private as sdk;
            ::std::thread_local! {
                static STATE: RefCell<sdk::tcp::State<$filter>> =
                    RefCell::new(sdk::tcp::State::default());
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_abi_version_0_2_1() {}
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
                sdk::allocate(size)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_context_create(ctx: u32, parent: u32) {
                STATE.with(|s| sdk::tcp::on_context_create(s, ctx, parent))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_vm_start(ctx: u32, size: usize) -> u32 {
                sdk::on_vm_start(ctx, size)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_configure(ctx: u32, size: usize) -> u32 {
                STATE.with(|s| sdk::tcp::on_configure(s, ctx, size))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_new_connection(ctx: u32) -> u32 {
                STATE.with(|s| sdk::tcp::on_new_connection(s, ctx))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_downstream_data(ctx: u32, size: usize, eos: u32) -> u32 {
                STATE.with(|s| sdk::tcp::on_downstream_data(s, ctx, size, eos))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_upstream_data(ctx: u32, size: usize, eos: u32) -> u32 {
                STATE.with(|s| sdk::tcp::on_upstream_data(s, ctx, size, eos))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_downstream_connection_close(ctx: u32, peer: u32) {
                STATE.with(|s| sdk::tcp::on_close(s, ctx, peer, false))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_upstream_connection_close(ctx: u32, peer: u32) {
                STATE.with(|s| sdk::tcp::on_close(s, ctx, peer, true))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_done(ctx: u32) -> u32 {
                sdk::on_done(ctx)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_log(ctx: u32) {
                STATE.with(|s| sdk::tcp::on_log(s, ctx))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_delete(ctx: u32) {
                STATE.with(|s| sdk::tcp::on_delete(s, ctx))
            }
        };
    };
}
