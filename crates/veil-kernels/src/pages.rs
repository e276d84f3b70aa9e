//! Huge pages for weight storage, and freed buffers kept for the next pass.
//!
//! A decode step streams every weight once (Gemma 3's 262,144-row head alone is 180 MB), and
//! with 4 KiB pages the walk misses the TLB every few rows. Linux gives anonymous memory huge
//! pages only where asked (`transparent_hugepage = madvise` is the common default), so large
//! matrices ask. A hint: where it is refused, nothing changes but speed.

/// Below this, a buffer cannot hold a whole 2 MiB page and the hint does nothing.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back `v`'s reserved storage with huge pages, before it is first written.
pub(crate) fn prefer_huge_pages<T>(v: &Vec<T>) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < 2 * HUGE_PAGE {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // madvise takes a page-aligned start: the first whole page inside the buffer.
        let page = 4096;
        let start = v.as_ptr() as usize;
        let aligned = start.next_multiple_of(page);
        let len = (start + bytes - aligned) / page * page;
        // SAFETY: the range lies inside `v`'s allocation; MADV_HUGEPAGE changes no contents
        // and its failure (an old kernel, THP off) leaves the memory as it was.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
}

/// Keeps the buffers a forward pass frees (activations, logits, cache copies: up to a few MB
/// each) in the process for the next pass, instead of glibc handing them back to the kernel
/// and the next pass faulting them in again, zeroed: 122,000 page faults in 30 SmolLM2
/// prompts, a few percent of a prompt's time, all on the calling thread while the pool's
/// worker waited; 35,000 with this (most of them loading the weights), and the same peak
/// memory. Buffers of 4 MiB and more still get pages of their own, and freed memory beyond
/// 16 MiB per allocator arena (a gateway's threads have several) still goes back. Call it once,
/// first thing in `main`; elsewhere than glibc it does nothing.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's thresholds; a value it refuses leaves the
    // default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}
