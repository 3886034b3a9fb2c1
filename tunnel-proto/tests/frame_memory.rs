//! A frame header alone does not make the receiver allocate what it announces: memory is
//! taken as the body's bytes arrive. Measured with a counting allocator (this test binary's
//! own), on the test's thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tunnel_proto::protocol::{AgentMessage, MAX_FRAME, ProtocolError, recv};

struct Counting;

thread_local! {
    /// The largest single allocation made on this thread.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: defers every call to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[tokio::test(flavor = "current_thread")]
async fn a_header_announcing_the_largest_frame_then_silence_allocates_one_chunk() {
    let (mut peer, ours) = UnixStream::pair().unwrap();
    let mut bytes = (MAX_FRAME as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"seq\":1");
    peer.write_all(&bytes).await.unwrap();
    drop(peer);
    LARGEST.with(|l| l.set(0));
    let error = recv::<AgentMessage>(&ours).await.unwrap_err();
    assert!(matches!(error, ProtocolError::Io(_)), "{error}");
    let largest = LARGEST.with(Cell::get);
    assert!(
        largest <= 64 << 10,
        "a {MAX_FRAME}-byte announcement allocated {largest} bytes at once"
    );
    // One byte over the limit is refused before any body is read, naming the limit.
    let (mut peer, ours) = UnixStream::pair().unwrap();
    peer.write_all(&((MAX_FRAME + 1) as u32).to_le_bytes())
        .await
        .unwrap();
    let error = recv::<AgentMessage>(&ours).await.unwrap_err().to_string();
    assert!(
        error.contains(&format!("over the limit of {MAX_FRAME} bytes")),
        "{error}"
    );
}
