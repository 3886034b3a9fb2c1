//! Helpers shared by unit tests.

use tokio::net::{TcpListener, TcpStream};

/// A connected loopback TCP pair: (the connecting end, the accepted end).
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}

/// The size of what `f` returns (an async fn's future: what its task carries), without
/// calling it.
pub fn size_of_return<A, F>(_: impl Fn(A) -> F) -> usize {
    std::mem::size_of::<F>()
}
