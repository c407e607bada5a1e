// The output cache of out_cache.h: a c10::Allocator whose freed blocks of 256 KB and more are kept, up to a
// limit on the bytes held, and handed to the next request of the same rounded size (most recently freed first;
// the oldest blocks go when a new one would pass the limit).
#include "out_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <pthread.h>

#include <cstdlib>
#include <mutex>
#include <vector>

namespace pysparse {
namespace cpu {
namespace {

constexpr size_t kAlignment = 64;                      // as c10's CPU allocator
constexpr size_t kHeader = kAlignment;                 // the block's size, in front of the data
constexpr size_t kMinCachedBytes = size_t{256} << 10;  // below this malloc's free lists serve without faults
constexpr size_t kGranule = size_t{64} << 10;          // cached sizes are rounded up to this
constexpr size_t kMaxBlocks = 64;
constexpr int64_t kDefaultLimit = int64_t{256} << 20;

struct Held {
  void* base;
  size_t bytes;
};

class OutCache final : public c10::Allocator {
 public:
  static OutCache& instance() {
    // Never destroyed: tensors freed while the process exits still return their blocks here.
    static OutCache* cache = [] {
      auto* c = new OutCache();
      // A child forked while another thread held the lock would wait on it forever: hold it across fork().
      pthread_atfork([] { instance().mu_.lock(); }, [] { instance().mu_.unlock(); },
                     [] { instance().mu_.unlock(); });
      return c;
    }();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = n < kMinCachedBytes ? n : (n + kGranule - 1) / kGranule * kGranule;
    void* base = bytes >= kMinCachedBytes ? take(bytes) : nullptr;
    if (base == nullptr && posix_memalign(&base, kAlignment, bytes + kHeader) != 0) base = nullptr;
    TORCH_CHECK_WITH(OutOfMemoryError, base != nullptr, "pysparse: out of CPU memory allocating ", n, " bytes");
    *static_cast<size_t*>(base) = bytes;
    void* data = static_cast<char*>(base) + kHeader;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  int64_t empty() { return static_cast<int64_t>(shrink_to(0)); }

  int64_t set_limit(int64_t bytes) {
    int64_t previous;
    {
      std::lock_guard<std::mutex> lock(mu_);
      previous = limit_;
      limit_ = bytes;
    }
    shrink_to(static_cast<size_t>(bytes));
    return previous;
  }

  int64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(held_);
  }

 private:
  static void release(void* data) {
    if (data == nullptr) return;
    void* base = static_cast<char*>(data) - kHeader;
    instance().put(base, *static_cast<size_t*>(base));
  }

  // The most recently freed block of exactly `bytes`, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->bytes != bytes) continue;
      void* base = it->base;
      held_ -= bytes;
      blocks_.erase(std::next(it).base());
      return base;
    }
    return nullptr;
  }

  void put(void* base, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (bytes >= kMinCachedBytes && static_cast<int64_t>(bytes) <= limit_) {
        evict_locked(static_cast<size_t>(limit_) - bytes, kMaxBlocks - 1, &drop);
        blocks_.push_back({base, bytes});
        held_ += bytes;
        base = nullptr;
      }
    }
    for (void* p : drop) std::free(p);
    std::free(base);
  }

  // Frees the oldest blocks until at most `bytes` are held; returns the bytes freed.
  size_t shrink_to(size_t bytes) {
    std::vector<void*> drop;
    size_t freed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const size_t before = held_;
      evict_locked(bytes, kMaxBlocks, &drop);
      freed = before - held_;
    }
    for (void* p : drop) std::free(p);
    return freed;
  }

  // Moves the oldest blocks to `drop` until at most `bytes` and `count` blocks are held (lock held).
  void evict_locked(size_t bytes, size_t count, std::vector<void*>* drop) {
    size_t n = 0;
    while (n < blocks_.size() && (held_ > bytes || blocks_.size() - n > count)) {
      drop->push_back(blocks_[n].base);
      held_ -= blocks_[n].bytes;
      ++n;
    }
    blocks_.erase(blocks_.begin(), blocks_.begin() + static_cast<std::ptrdiff_t>(n));
  }

  std::mutex mu_;
  std::vector<Held> blocks_;  // oldest first
  size_t held_ = 0;
  int64_t limit_ = kDefaultLimit;
};

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "cached_empty: internal error, device ", options.device());
  const at::ScalarType dtype = c10::typeMetaToScalarType(options.dtype());
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes < static_cast<int64_t>(kMinCachedBytes)) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &OutCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, options.memory_format_opt());
}

int64_t empty_cpu_cache() { return OutCache::instance().empty(); }

int64_t set_cpu_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_cpu_cache_limit: bytes must be >= 0, got ", bytes);
  return OutCache::instance().set_limit(bytes);
}

int64_t cpu_cache_bytes() { return OutCache::instance().held(); }

}  // namespace cpu
}  // namespace pysparse
