//! The global allocator: a linked-list heap over the RAM between the end of the image and the top of RAM.
//!
//! The guest has one vCPU and no interrupts, so the heap sits in a plain cell: no lock, no atomic instruction.

use core::{
    alloc::{GlobalAlloc, Layout},
    cell::UnsafeCell,
    ptr::{self, NonNull},
};

use linked_list_allocator::Heap;

unsafe extern "C" {
    /// End of the loaded image (linker script), page aligned.
    static __image_end: u8;
}

struct SingleCpuHeap(UnsafeCell<Heap>);

// SAFETY: the guest runs on one vCPU without interrupts, so the heap is never used from two contexts at once.
unsafe impl Sync for SingleCpuHeap {}

#[global_allocator]
static HEAP: SingleCpuHeap = SingleCpuHeap(UnsafeCell::new(Heap::empty()));

// SAFETY: one vCPU, no interrupts, no re-entrancy (the heap does not allocate): every access to the cell is
// exclusive. `Heap` returns properly sized and aligned blocks from the region given to `init`.
unsafe impl GlobalAlloc for SingleCpuHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: exclusive access, see above.
        let heap = unsafe { &mut *self.0.get() };
        heap.allocate_first_fit(layout)
            .map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: exclusive access; the caller passes a block this allocator returned, with its layout.
        unsafe {
            let heap = &mut *self.0.get();
            if let Some(block) = NonNull::new(ptr) {
                heap.deallocate(block, layout);
            }
        }
    }
}

/// Gives the heap all RAM from the end of the image up to `ram_top` (exclusive).
pub fn init(ram_top: u64) {
    let start = (&raw const __image_end) as u64;
    assert!(
        ram_top > start + (1 << 20),
        "RAM ({ram_top:#x} bytes) ends too close to the image end {start:#x}"
    );
    // SAFETY: [start, ram_top) is RAM that nothing else uses (the image and its stack end at `start`), identity
    // mapped; init runs once, before the first allocation.
    unsafe { (*HEAP.0.get()).init(start as *mut u8, (ram_top - start) as usize) };
    crate::log!(
        "guest: heap {:#x}..{:#x} ({} MiB)",
        start,
        ram_top,
        (ram_top - start) >> 20
    );
}
