//! Huge pages for weight storage.
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
