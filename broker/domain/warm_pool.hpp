// The warm pool (docs/pool.md): jailed QEMUs of configured shapes, spawned paused (-S) with no
// devices, each under its own uid, before any create asks for them. A create whose spec matches
// a shape takes one instead of spawning; its devices are then plugged over QMP and a
// system_reset gives the firmware their boot order. A shape boots through firmware, or carries
// the kernel its QEMUs load at spawn and serves the direct kernel boots of that kernel. A shape kept for restores
// (for=restore) is spawned with -incoming defer as well: a restore of a saved domain of that
// shape takes one, plugs the devices and feeds it the saved state.
//
// Crash consistency: a pooled QEMU has a uid record (owner "_pool-N") and no domain record, so a
// broker that dies with entries in the pool has them killed by uid and their files removed by
// the next one's reclaim, as any uid recorded without a domain.
//
// Threads: everything here runs on the broker's io_context; spawns and kills run on the Domains'
// lifecycle pool.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/object.hpp>

#include "broker/core/error.hpp"
#include "broker/lifecycle/launcher.hpp"

namespace broker {

class Domains;
class WarmPool;

// What a RefillHold shares with its pool: the creates in flight, and the pool while it lives.
struct RefillState {
  std::size_t creating = 0;
  WarmPool* pool = nullptr;
};

// What a shape's QEMUs are kept for: creates, or restores (spawned with -incoming defer, which
// only a migration stream can take out of its incoming state).
enum class PoolUse { create, restore };
std::string_view to_string(PoolUse use);

// One shape: "machine=q35,memory_mib=128,vcpus=1,firmware=bios,count=2" (--pool), with
// ",for=restore" for a shape kept for restores. A shape may carry a kernel (with an initrd and
// an append line): its QEMUs load that kernel at spawn and serve the direct kernel boots of it.
// A comma inside a value is written twice, as in QEMU's options: "append=console=ttyS0,,115200".
struct PoolShape {
  lifecycle::Machine machine = lifecycle::Machine::q35;
  std::uint32_t memory_mib = 128;
  std::uint32_t vcpus = 1;
  lifecycle::Firmware firmware = lifecycle::Firmware::bios;
  std::uint32_t pci_slots = 4;
  std::uint32_t count = 1;
  PoolUse use = PoolUse::create;
  std::string kernel;
  std::string initrd;
  std::string append;
  bool operator==(const PoolShape&) const = default;
};

// Parses a shape; the error names the key ("pool: memory_mib must be ...").
Result<PoolShape> parse_pool_shape(std::string_view text);
// The shape as parse_pool_shape reads it.
std::string to_string(const PoolShape& shape);
// True when a create (or, with PoolUse::restore, a restore) of `spec` may take a QEMU of `shape`:
// kept for that use, same machine, memory, vcpus, firmware and PCIe slots, no own variable store,
// no Xen, and booted as the shape's QEMUs boot. A shape without a kernel serves what boots
// through firmware with a boot order (pooled QEMUs boot strictly from the devices a create
// names); one with a kernel serves the direct kernel boots of the same kernel, initrd and append
// line, by path (WarmPool::take compares the files too). A restored guest reboots into the kernel
// its QEMU loaded at spawn, so the same holds for restores.
bool matches(const PoolShape& shape, const lifecycle::DomainSpec& spec,
             PoolUse use = PoolUse::create);

class WarmPool {
 public:
  WarmPool(boost::asio::any_io_executor ex, Domains& domains, std::vector<PoolShape> shapes);
  WarmPool(const WarmPool&) = delete;
  WarmPool& operator=(const WarmPool&) = delete;

  bool enabled() const { return !shapes_.empty(); }
  // Starts filling in the background. Call once the broker has recovered: the pool's uids must
  // not race the reclaim of an earlier broker's.
  void start();
  // A ready QEMU for a create (or restore) of `spec`, or nullopt when no shape matches or none
  // of it is ready. A QEMU found dead, or one whose kernel or initrd is no longer the file at
  // its path (replaced or rewritten since its spawn), is discarded on the way. The refill is
  // woken either way.
  std::optional<lifecycle::Instance> take(const lifecycle::DomainSpec& spec,
                                          PoolUse use = PoolUse::create);
  // Creates and restores in flight hold the refill back: it spawns only when none runs. Each
  // holds a RefillHold for its whole run; it may outlive the pool (a coroutine frame destroyed
  // with its io_context), and then only the count it shares with the pool goes.
  class RefillHold {
   public:
    explicit RefillHold(WarmPool& pool);
    ~RefillHold();
    RefillHold(const RefillHold&) = delete;
    RefillHold& operator=(const RefillHold&) = delete;

   private:
    std::shared_ptr<struct RefillState> state_;
  };
  RefillHold hold_refill() { return RefillHold(*this); }
  ~WarmPool();
  // Stops the refill and kills every pooled QEMU by uid.
  boost::asio::awaitable<void> stop();
  // GET /v1/pool.
  boost::json::object to_json() const;
  // Pooled QEMUs ready now, for the metrics.
  std::size_t size() const { return entries_.size(); }
  // Uids the pool holds: its ready QEMUs and those whose kill has yet to succeed.
  std::size_t uids_held() const { return entries_.size() + stale_.size() + doomed_.size(); }

 private:
  struct Entry {
    std::size_t shape;
    lifecycle::Instance instance;
    std::chrono::system_clock::time_point ready_since;
  };
  boost::asio::awaitable<void> refill();
  // Discards the entries whose QEMU is gone, and those take() found stale; returns how many.
  boost::asio::awaitable<std::size_t> discard_dead();
  // Kills `instance` by uid and removes its log; one whose kill fails waits in doomed_ for the
  // next pass. `retry`: it came from doomed_ (its failure was logged already).
  boost::asio::awaitable<void> discard(lifecycle::Instance instance, bool retry);
  std::optional<std::size_t> wanting() const;
  void wake();

  boost::asio::any_io_executor ex_;
  Domains& domains_;
  std::vector<PoolShape> shapes_;
  std::vector<Entry> entries_;
  std::vector<lifecycle::Instance> stale_;   // taken out by take(): their boot files changed
  std::vector<lifecycle::Instance> doomed_;  // discarded, but their kill failed
  boost::asio::steady_timer wake_;
  std::shared_ptr<RefillState> refill_state_;
  std::uint64_t next_name_ = 1;
  bool running_ = false;
  bool stopping_ = false;
  bool stopped_ = false;
  // Counters for GET /v1/pool.
  std::uint64_t hits_ = 0;
  std::uint64_t misses_ = 0;
  std::uint64_t discarded_ = 0;
  std::string last_error_;
};

}  // namespace broker
