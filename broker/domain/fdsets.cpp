#include "broker/domain/fdsets.hpp"

#include <set>
#include <string>

#include "broker/core/log.hpp"
#include "broker/domain/qmp_call.hpp"
#include "broker/lifecycle/firmware.hpp"
#include "qmp/commands.hpp"

namespace broker {
namespace {

using Held = std::map<std::int64_t, std::string>;

// The fdset ids the domain's devices use now.
std::set<std::int64_t> in_use(const Domain& d) {
  std::set<std::int64_t> out;
  for (const auto& [id, disk] : d.disks) {
    if (disk.fdset >= 0) out.insert(disk.fdset);
    if (disk.backing_fdset >= 0) out.insert(disk.backing_fdset);
  }
  for (const auto& [id, cd] : d.cdroms) {
    if (cd.fdset >= 0) out.insert(cd.fdset);
  }
  if (d.spec().firmware == lifecycle::Firmware::uefi) {
    out.insert(lifecycle::kFirmwareCodeFdset);
    out.insert(lifecycle::kFirmwareVarsFdset);
  }
  return out;
}

// The device an fdset was given for, from its opaque "qb:<id>"; "?" for one the broker did not add.
std::string owner_of(const qmp::reply::FdsetInfo& set) {
  for (const auto& fd : set.fds) {
    if (fd.opaque && fd.opaque->starts_with("qb:")) return fd.opaque->substr(3);
  }
  return "?";
}

boost::asio::awaitable<Result<std::vector<qmp::reply::FdsetInfo>>> list(
    Domain& d, std::chrono::milliseconds timeout) {
  qmp::Command c = qmp::cmd::query_fdsets();
  auto r = co_await qmp_call(d, std::move(c), timeout);
  if (!r) co_return r.error();
  auto sets = qmp::reply::fdsets(*r);
  if (!sets) co_return from_qmp(sets.error(), "domain " + d.name() + ": query-fdsets");
  co_return std::move(*sets);
}

boost::asio::awaitable<void> remove(Domain& d, std::int64_t fdset,
                                    std::chrono::milliseconds timeout) {
  qmp::Command c = qmp::cmd::remove_fd(fdset);
  auto r = co_await qmp_call(d, std::move(c), timeout);
  // Not found: gone already (QEMU closed it, or a resume and a job both removed it).
  if (!r && r.error().qmp_desc.find("not found") == std::string::npos) log::warn("domain " + d.name() + ": remove-fd " + std::to_string(fdset) + ": " +
                    r.error().describe());
}

// Sets fdsets_to_close to the entries of `candidates` QEMU still lists; true when it changed.
boost::asio::awaitable<Result<bool>> keep_listed(Domain& d, const Held& candidates,
                                                 std::chrono::milliseconds timeout) {
  auto after = co_await list(d, timeout);
  if (!after) co_return after.error();
  Held still;
  for (const auto& set : *after) {
    if (auto it = candidates.find(set.fdset_id); it != candidates.end()) still.insert(*it);
  }
  const bool changed = still != d.fdsets_to_close;
  if (changed && !still.empty()) {
    std::string ids;
    for (const auto& [fdset, device] : still) ids += " " + std::to_string(fdset) + " (" + device + ")";
    log::info("domain " + d.name() + ": QEMU keeps fdsets" + ids +
              " open until the VM runs; they are removed then");
  }
  d.fdsets_to_close = std::move(still);
  co_return changed;
}

}  // namespace

boost::asio::awaitable<Result<bool>> collect_fdsets(Domain& d, std::chrono::milliseconds timeout) {
  auto sets = co_await list(d, timeout);
  if (!sets) co_return sets.error();
  const auto needed = in_use(d);
  Held unneeded;
  for (const auto& set : *sets) {
    if (needed.contains(set.fdset_id)) continue;
    unneeded[set.fdset_id] = owner_of(set);
    co_await remove(d, set.fdset_id, timeout);
  }
  co_return co_await keep_listed(d, unneeded, timeout);
}

boost::asio::awaitable<Result<bool>> close_held_fdsets(Domain& d, std::chrono::milliseconds timeout) {
  if (d.fdsets_to_close.empty()) co_return false;
  const Held held = d.fdsets_to_close;
  for (const auto& [fdset, device] : held) co_await remove(d, fdset, timeout);
  co_return co_await keep_listed(d, held, timeout);
}

}  // namespace broker
