#include "broker/domain/warm_pool.hpp"

#include <poll.h>

#include <charconv>
#include <utility>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json/array.hpp>

#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/domain/blocking.hpp"
#include "broker/domain/domains.hpp"

namespace broker {
namespace asio = boost::asio;
namespace json = boost::json;
using asio::awaitable;
using namespace std::chrono_literals;

namespace {

Error pool_error(std::string message) {
  Error e(make_error_code(errc::invalid_argument), "pool: " + std::move(message));
  e.field = "pool";
  return e;
}

Result<std::uint32_t> number(std::string_view key, std::string_view value, std::uint32_t min,
                             std::uint32_t max) {
  std::uint32_t n = 0;
  auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n);
  if (ec != std::errc() || end != value.data() + value.size() || n < min || n > max) {
    return pool_error(std::string(key) + " must be a number from " + std::to_string(min) + " to " +
                      std::to_string(max) + ", got '" + std::string(value) + "'");
  }
  return n;
}

// The spec a pooled QEMU of `shape` is spawned with: what a matching create would give, minus
// its name and devices. A boot order makes the command line strict (-boot strict=on), which no
// QMP command can change later; the create's own devices carry the bootindexes.
lifecycle::DomainSpec spec_for(const PoolShape& shape) {
  lifecycle::DomainSpec spec;
  spec.name = "pool";
  spec.machine = shape.machine;
  spec.memory_mib = shape.memory_mib;
  spec.vcpus = shape.vcpus;
  spec.firmware = shape.firmware;
  spec.pci_slots = shape.pci_slots;
  spec.kernel = shape.kernel;
  spec.initrd = shape.initrd;
  spec.append = shape.append;
  if (shape.kernel.empty()) spec.boot_order = {"pooled"};
  return spec;
}

// True while the QEMU behind `pidfd` runs (a pidfd turns readable when its process exits).
bool running(const lifecycle::Instance& inst) {
  if (!inst.pidfd) return false;
  pollfd p{inst.pidfd.get(), POLLIN, 0};
  return ::poll(&p, 1, 0) == 0;
}

json::value nullable(const std::string& s) {
  return s.empty() ? json::value(nullptr) : json::value(s);
}

std::string iso8601(std::chrono::system_clock::time_point t) {
  const std::time_t secs = std::chrono::system_clock::to_time_t(t);
  std::tm tm{};
  ::gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// "a=1,b=x,,y" as its items "a=1" and "b=x,y": a doubled comma is a comma of the value.
std::vector<std::string> split_items(std::string_view text) {
  std::vector<std::string> items(1);
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] != ',') {
      items.back() += text[i];
    } else if (i + 1 < text.size() && text[i + 1] == ',') {
      items.back() += ',';
      ++i;
    } else {
      items.emplace_back();
    }
  }
  if (text.empty()) items.clear();
  return items;
}

std::string escape_commas(std::string_view value) {
  std::string out;
  for (char c : value) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

}  // namespace

Result<PoolShape> parse_pool_shape(std::string_view text) {
  PoolShape shape;
  bool seen_count = false;
  std::vector<std::string> seen;
  for (const std::string& item_text : split_items(text)) {
    const std::string_view item = item_text;
    const auto eq = item.find('=');
    if (eq == std::string_view::npos) {
      return pool_error("'" + std::string(item) + "' is not KEY=VALUE");
    }
    const std::string key(item.substr(0, eq));
    const std::string_view value = item.substr(eq + 1);
    if (std::find(seen.begin(), seen.end(), key) != seen.end()) {
      return pool_error(std::string(key) + " is given twice");
    }
    seen.push_back(key);
    if (key == "kernel" || key == "initrd" || key == "append") {
      if (value.empty()) return pool_error(key + " is empty");
      (key == "kernel" ? shape.kernel : key == "initrd" ? shape.initrd : shape.append) = value;
    } else if (key == "machine") {
      if (value != "q35") return pool_error("machine must be q35: only a machine that boots can be pooled");
    } else if (key == "memory_mib") {
      auto n = number(key, value, 16, 1u << 20);
      if (!n) return n.error();
      shape.memory_mib = *n;
    } else if (key == "vcpus") {
      auto n = number(key, value, 1, 255);
      if (!n) return n.error();
      shape.vcpus = *n;
    } else if (key == "pci_slots") {
      auto n = number(key, value, 0, 32);
      if (!n) return n.error();
      shape.pci_slots = *n;
    } else if (key == "firmware") {
      if (value == "uefi") {
        return pool_error("firmware uefi cannot be pooled: a UEFI domain's variable store is its "
                          "own from the spawn on");
      }
      if (value != "bios") return pool_error("firmware must be bios, got '" + std::string(value) + "'");
    } else if (key == "for") {
      if (value == "restore") {
        shape.use = PoolUse::restore;
      } else if (value != "create") {
        return pool_error("for must be create or restore, got '" + std::string(value) + "'");
      }
    } else if (key == "count") {
      auto n = number(key, value, 1, 64);
      if (!n) return n.error();
      shape.count = *n;
      seen_count = true;
    } else {
      return pool_error("unknown key '" + std::string(key) +
                        "' (machine, memory_mib, vcpus, firmware, pci_slots, count, for, kernel, "
                        "initrd, append)");
    }
  }
  if (!seen_count) return pool_error("count is needed: how many QEMUs of the shape to keep");
  if (shape.kernel.empty() && !shape.append.empty()) {
    return pool_error("append needs a kernel: it is the kernel's command line");
  }
  // The same bounds a create's spec has.
  lifecycle::DomainSpec spec = spec_for(shape);
  if (auto ok = lifecycle::validate(spec); !ok) return pool_error(ok.error().message);
  return shape;
}

std::string_view to_string(PoolUse use) { return use == PoolUse::restore ? "restore" : "create"; }

std::string to_string(const PoolShape& s) {
  std::string out = "machine=" + std::string(lifecycle::to_string(s.machine)) +
                    ",memory_mib=" + std::to_string(s.memory_mib) +
                    ",vcpus=" + std::to_string(s.vcpus) +
                    ",firmware=" + std::string(lifecycle::to_string(s.firmware)) +
                    ",pci_slots=" + std::to_string(s.pci_slots) + ",count=" + std::to_string(s.count);
  if (s.use == PoolUse::restore) out += ",for=restore";
  for (auto [key, value] : {std::pair{",kernel=", &s.kernel}, std::pair{",initrd=", &s.initrd},
                            std::pair{",append=", &s.append}}) {
    if (!value->empty()) out += key + escape_commas(*value);
  }
  return out;
}

bool matches(const PoolShape& shape, const lifecycle::DomainSpec& spec, PoolUse use) {
  return shape.use == use && spec.machine == shape.machine && spec.memory_mib == shape.memory_mib &&
         spec.vcpus == shape.vcpus && spec.firmware == shape.firmware &&
         spec.pci_slots == shape.pci_slots && spec.accel == lifecycle::Accel::automatic &&
         spec.kernel == shape.kernel && spec.initrd == shape.initrd &&
         spec.append == shape.append && spec.boot_order.empty() == !shape.kernel.empty() &&
         !spec.secure_boot && spec.nvram.empty() && !spec.xen;
}

WarmPool::WarmPool(asio::any_io_executor ex, Domains& domains, std::vector<PoolShape> shapes)
    : ex_(ex),
      domains_(domains),
      shapes_(std::move(shapes)),
      wake_(ex),
      refill_state_(std::make_shared<RefillState>()) {
  refill_state_->pool = this;
}

WarmPool::~WarmPool() { refill_state_->pool = nullptr; }

WarmPool::RefillHold::RefillHold(WarmPool& pool) : state_(pool.refill_state_) { ++state_->creating; }

WarmPool::RefillHold::~RefillHold() {
  if (--state_->creating == 0 && state_->pool != nullptr) state_->pool->wake();
}

void WarmPool::start() {
  if (shapes_.empty() || running_ || stopping_) return;
  running_ = true;
  for (const auto& shape : shapes_) log::info("pool: keeping " + to_string(shape));
  asio::co_spawn(ex_, refill(), asio::detached);
}

void WarmPool::wake() { wake_.cancel(); }

std::optional<lifecycle::Instance> WarmPool::take(const lifecycle::DomainSpec& spec,
                                                  PoolUse use) {
  bool shaped = false;
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (!matches(shapes_[it->shape], spec, use)) {
      ++it;
      continue;
    }
    shaped = true;
    if (!running(it->instance)) {
      ++it;  // discard_dead takes it out
      continue;
    }
    // A few syscalls on this thread: the kernel file's path opened beneath its root, and fstat.
    if (!shapes_[it->shape].kernel.empty() &&
        !domains_.launcher().boot_files_current(it->instance, spec)) {
      log::info("pool: " + it->instance.name + " (uid " + std::to_string(it->instance.uid) +
                ") loaded a kernel or initrd that is no longer the file at its path; discarding it");
      stale_.push_back(std::move(it->instance));
      it = entries_.erase(it);
      continue;
    }
    lifecycle::Instance inst = std::move(it->instance);
    entries_.erase(it);
    ++hits_;
    wake();
    return inst;
  }
  if (shaped || std::any_of(shapes_.begin(), shapes_.end(),
                            [&spec, use](const PoolShape& s) { return matches(s, spec, use); })) {
    ++misses_;
  }
  wake();
  return std::nullopt;
}

std::optional<std::size_t> WarmPool::wanting() const {
  for (std::size_t i = 0; i < shapes_.size(); ++i) {
    std::size_t have = 0;
    for (const auto& e : entries_) have += e.shape == i ? 1 : 0;
    if (have < shapes_[i].count) return i;
  }
  return std::nullopt;
}

awaitable<void> WarmPool::discard(lifecycle::Instance instance, bool retry) {
  const std::string name = instance.name;
  auto& launcher = domains_.launcher();
  lifecycle::Instance* inst = &instance;
  auto killed = co_await run_blocking(ex_, domains_.lifecycle_pool(),
                                      [&launcher, inst] { return launcher.destroy(*inst); });
  if (!killed) {
    // The uid stays recorded and in use; the refill tries again each pass (and a restarted
    // broker would reclaim it). Said once.
    if (!retry) {
      log::error("pool: discarding " + name + " (uid " + std::to_string(instance.uid) +
                 "): " + killed.error().describe() + "; retrying");
    }
    doomed_.push_back(std::move(instance));
    co_return;
  }
  launcher.remove_log(name);
  ++discarded_;
}

awaitable<std::size_t> WarmPool::discard_dead() {
  std::vector<lifecycle::Instance> dead;
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (running(it->instance)) {
      ++it;
      continue;
    }
    log::warn("pool: " + it->instance.name + " (uid " + std::to_string(it->instance.uid) +
              ") exited while pooled; discarding it");
    dead.push_back(std::move(it->instance));
    it = entries_.erase(it);
  }
  for (auto& inst : stale_) dead.push_back(std::move(inst));
  stale_.clear();
  for (auto& inst : dead) co_await discard(std::move(inst), false);
  // Those whose kill failed before, once more.
  std::vector<lifecycle::Instance> again = std::move(doomed_);
  doomed_.clear();
  for (auto& inst : again) co_await discard(std::move(inst), true);
  co_return dead.size();
}

awaitable<void> WarmPool::refill() {
  while (!stopping_) {
    co_await discard_dead();
    const auto shape = wanting();
    auto pause = 1000ms;
    if (shape && refill_state_->creating == 0) {
      const lifecycle::DomainSpec spec = spec_for(shapes_[*shape]);
      const std::string name = std::string(lifecycle::Launcher::kPoolPrefix) + std::to_string(next_name_++);
      auto& launcher = domains_.launcher();
      const lifecycle::DomainSpec* s = &spec;
      const std::string* n = &name;
      const bool incoming = shapes_[*shape].use == PoolUse::restore;
      auto inst = co_await run_blocking(ex_, domains_.lifecycle_pool(), [&launcher, s, n, incoming] {
        return launcher.start_pooled(*s, *n, incoming);
      });
      if (inst && !stopping_) {
        inst->pooled = true;
        entries_.push_back(Entry{*shape, std::move(*inst), std::chrono::system_clock::now()});
        last_error_.clear();
        continue;
      }
      if (inst) {
        co_await discard(std::move(*inst), false);
        break;
      }
      // Said once per distinct error; the refill tries again after a pause.
      if (inst.error().describe() != last_error_) {
        last_error_ = inst.error().describe();
        log::error("pool: cannot start a QEMU of shape " + to_string(shapes_[*shape]) + ": " +
                   last_error_);
      }
      pause = 5000ms;
    }
    wake_.expires_after(pause);
    co_await wake_.async_wait(asio::as_tuple(asio::use_awaitable));
  }
  running_ = false;
}

awaitable<void> WarmPool::stop() {
  stopping_ = true;
  wake();
  // The refill ends at its next wake; a spawn in flight finishes first and is discarded.
  asio::steady_timer tick(ex_);
  while (running_) {
    tick.expires_after(5ms);
    co_await tick.async_wait(asio::as_tuple(asio::use_awaitable));
  }
  std::vector<Entry> all = std::move(entries_);
  entries_.clear();
  for (auto& inst : stale_) all.push_back(Entry{0, std::move(inst), {}});
  stale_.clear();
  for (auto& e : all) co_await discard(std::move(e.instance), false);
  std::vector<lifecycle::Instance> again = std::move(doomed_);
  doomed_.clear();
  for (auto& inst : again) co_await discard(std::move(inst), true);
  if (!all.empty()) log::info("pool: stopped; killed " + std::to_string(all.size()) + " pooled QEMU(s) by uid");
}

json::object WarmPool::to_json() const {
  json::array shapes;
  for (std::size_t i = 0; i < shapes_.size(); ++i) {
    json::array ready;
    for (const auto& e : entries_) {
      if (e.shape != i) continue;
      ready.push_back(json::object{{"uid", e.instance.uid},
                                   {"pid", e.instance.pid},
                                   {"accel", lifecycle::to_string(e.instance.accel)},
                                   {"since", iso8601(e.ready_since)}});
    }
    const auto& s = shapes_[i];
    shapes.push_back(json::object{{"shape", to_string(s)},
                                  {"machine", lifecycle::to_string(s.machine)},
                                  {"memory_mib", s.memory_mib},
                                  {"vcpus", s.vcpus},
                                  {"firmware", lifecycle::to_string(s.firmware)},
                                  {"pci_slots", s.pci_slots},
                                  {"count", s.count},
                                  {"for", to_string(s.use)},
                                  {"kernel", nullable(s.kernel)},
                                  {"initrd", nullable(s.initrd)},
                                  {"append", nullable(s.append)},
                                  {"ready", std::move(ready)}});
  }
  json::object o{{"shapes", std::move(shapes)},
                 {"hits", hits_},
                 {"misses", misses_},
                 {"discarded", discarded_},
                 {"refill_held", refill_state_->creating > 0}};
  o["last_error"] = last_error_.empty() ? json::value(nullptr) : json::value(last_error_);
  return o;
}

}  // namespace broker
