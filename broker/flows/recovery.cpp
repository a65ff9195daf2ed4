#include "broker/flows/recovery.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <charconv>
#include <memory>
#include <utility>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "broker/core/atomic_file.hpp"
#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/domain/fdsets.hpp"
#include "broker/flows/common.hpp"

namespace broker::flows {
namespace asio = boost::asio;
using asio::awaitable;
using namespace detail;

namespace {

// True when QEMU has a device called `id` under /machine/peripheral.
awaitable<bool> device_present(Context& ctx, Domain& d, std::string id) {
  qmp::Command list = qmp::cmd::qom_list("/machine/peripheral");
  auto peripherals = co_await call(ctx, d, std::move(list));
  if (!peripherals) co_return false;
  auto props = qmp::reply::qom_list(*peripherals);
  if (!props) co_return false;
  for (const auto& p : *props) {
    if (p.name == id) co_return true;
  }
  co_return false;
}

// Everything a disk or NIC flow builds below the device: block nodes, netdev and the tap fd. Each
// step is best effort: an interrupted flow may have got to any of them. The fdsets it added are
// collected after the job is settled (collect_fdsets).
awaitable<void> remove_back_end(Context& ctx, Domain& d, std::string id) {
  for (auto& node : block_nodes(id)) {
    if (auto r = co_await delete_node(ctx, d, node); !r) {
      log::error("domain " + d.name() + ": " + r.error().describe());
    }
  }
  qmp::Command netdev = qmp::cmd::netdev_del(netdev_id(id));
  co_await call(ctx, d, std::move(netdev));
  qmp::Command tap = qmp::cmd::closefd(tap_fd_name(id));
  co_await call(ctx, d, std::move(tap));
}

// Takes out a device an interrupted addition plugged. False when the guest does not release it.
awaitable<bool> unplug_added(Context& ctx, Domain& d, std::string id) {
  auto sub = d.qmp()->subscribe();
  qmp::Command del = qmp::cmd::device_del(id);
  if (!co_await call(ctx, d, std::move(del))) co_return true;
  auto gone = co_await sub.wait_for(qmp::event::device_deleted(id), qmp::after(ctx.timeouts.unplug));
  co_return static_cast<bool>(gone);
}

// The fdset of the medium QEMU has in CD drive `id` now, -1 for none; nullopt when QEMU does not
// say or shows a medium the broker did not insert.
awaitable<std::optional<std::int64_t>> medium_in_qemu(Context& ctx, Domain& d, const std::string& id) {
  qmp::Command query = qmp::cmd::query_block();
  auto r = co_await call(ctx, d, std::move(query));
  if (!r) co_return std::nullopt;
  auto blocks = qmp::reply::block(*r);
  if (!blocks) co_return std::nullopt;
  for (const auto& b : *blocks) {
    if (b.qdev != id) continue;
    if (!b.file) co_return -1;
    constexpr std::string_view prefix = "/dev/fdset/";
    if (!b.file->starts_with(prefix)) co_return std::nullopt;
    std::int64_t fdset = -1;
    const char* first = b.file->data() + prefix.size();
    const char* last = b.file->data() + b.file->size();
    auto [end, ec] = std::from_chars(first, last, fdset);
    if (ec != std::errc() || end != last) co_return std::nullopt;
    co_return fdset;
  }
  co_return std::nullopt;
}

// The identity of the file QEMU holds in `fdset`, read through its fd table.
awaitable<fdpass::Identity> identity_in_qemu(Context& ctx, Domain& d, std::int64_t fdset) {
  qmp::Command query = qmp::cmd::query_fdsets();
  auto r = co_await call(ctx, d, std::move(query));
  if (!r) co_return fdpass::Identity{};
  auto sets = qmp::reply::fdsets(*r);
  if (!sets) co_return fdpass::Identity{};
  for (const auto& set : *sets) {
    if (set.fdset_id != fdset || set.fds.empty()) continue;
    const std::string path = "/proc/" + std::to_string(d.instance().pid) + "/fd/" +
                             std::to_string(set.fds.front().fd);
    fdpass::UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
    if (!fd) co_return fdpass::Identity{};
    auto id = fdpass::identify(fd.borrow());
    co_return id ? *id : fdpass::Identity{};
  }
  co_return fdpass::Identity{};
}

// An interrupted medium change: the record takes the medium QEMU shows. The medium the change
// put in (or the one it took out) is the one QEMU reads from now; what is left of the other is
// collected with the fdsets no device uses.
awaitable<void> reconcile_medium(Context& ctx, Domain& d, const Domain::PendingJob& job) {
  auto it = d.cdroms.find(job.target);
  if (it == d.cdroms.end()) co_return;
  CdromState& cd = it->second;
  auto now = co_await medium_in_qemu(ctx, d, job.target);
  if (!now) {
    log::error("domain " + d.name() + ": CD drive " + job.target +
               ": QEMU does not show which medium it holds; the record is kept");
    co_return;
  }
  if (*now == cd.fdset) co_return;  // the change had not happened
  if (*now < 0) {
    cd.path.clear();
    cd.identity = {};
    cd.fdset = -1;
    co_return;
  }
  auto path = job.args.if_contains("path");
  cd.path = path && path->is_string() ? std::string(path->get_string()) : std::string("(unknown)");
  cd.identity = co_await identity_in_qemu(ctx, d, *now);
  cd.fdset = *now;
}

// The address a client reaches QEMU's VNC server at, as set_vnc reports it ("127.0.0.1:5901",
// "[::1]:5901", "unix:/path"); empty when QEMU does not listen.
std::string vnc_address(const qmp::reply::VncInfo& info) {
  if (!info.enabled || !info.host) return {};
  if (info.family == "unix") return "unix:" + *info.host;
  const std::string host = info.family == "ipv6" ? "[" + *info.host + "]" : *info.host;
  return host + ":" + info.service.value_or("");
}

// The Unix socket path of a listen spec, or "".
std::string unix_path(const std::string& listen) {
  auto parsed = VncListen::parse(listen);
  return parsed && parsed->is_unix() ? parsed->unix_path : std::string();
}

// An interrupted VNC handover: the record takes what QEMU serves. QEMU listens on the new
// listener (the handover happened), still on the old one, or on none; a socket file the
// interrupted job bound that no listener uses goes.
awaitable<void> reconcile_vnc(Context& ctx, Domain& d, const Domain::PendingJob& job) {
  qmp::Command query = qmp::cmd::query_vnc();
  auto r = co_await call(ctx, d, std::move(query));
  std::optional<qmp::reply::VncInfo> info;
  if (r) {
    if (auto parsed = qmp::reply::vnc(*r)) info = *parsed;
  }
  // A named listener fd QEMU took and never used.
  qmp::Command close = qmp::cmd::closefd(std::string(kVncFd));
  co_await call(ctx, d, std::move(close));
  if (!info) {
    log::error("domain " + d.name() + ": QEMU does not say whether it serves VNC; the record is kept");
    co_return;
  }
  const std::string now = vnc_address(*info);
  const auto* listen = job.args.if_contains("listen");
  const std::string asked = listen && listen->is_string() ? std::string(listen->get_string()) : "";
  const std::string old_path = d.vnc ? unix_path(d.vnc->spec.listen.text()) : "";
  const std::string new_path = unix_path(asked);
  if (now.empty()) {
    d.vnc.reset();
    for (const auto& path : {old_path, new_path}) {
      if (!path.empty()) ::unlink(path.c_str());
    }
    co_return;
  }
  if (d.vnc && d.vnc->address == now) {
    if (!new_path.empty() && new_path != old_path) ::unlink(new_path.c_str());
    co_return;  // the old listener serves on
  }
  auto spec = VncListen::parse(asked, "vnc.listen");
  if (job.kind != "vnc-set" || !spec) {
    log::error("domain " + d.name() + ": QEMU serves VNC at " + now + ", which the record does not name");
    co_return;
  }
  if (!old_path.empty() && old_path != new_path) ::unlink(old_path.c_str());
  d.vnc = VncState{VncSpec{std::move(*spec)}, now};
}

// The fdset whose opaque is `opaque`, or -1.
std::int64_t fdset_named(const std::vector<qmp::reply::FdsetInfo>& sets, const std::string& opaque) {
  for (const auto& set : sets) {
    for (const auto& fd : set.fds) {
      if (fd.opaque == opaque) return set.fdset_id;
    }
  }
  return -1;
}

// The name of the tap behind one of QEMU's /dev/net/tun fds that no NIC of the domain names yet
// (the kernel's "iff" in its fdinfo), or "" when there is not exactly one.
std::string unclaimed_tap(const Domain& d) {
  const std::string proc = "/proc/" + std::to_string(d.instance().pid);
  std::vector<std::string> found;
  for (const auto& fd : list_dir(proc + "/fd")) {
    char target[64] = {};
    const ssize_t n = ::readlink((proc + "/fd/" + fd).c_str(), target, sizeof(target) - 1);
    if (n <= 0 || std::string_view(target, static_cast<std::size_t>(n)) != "/dev/net/tun") continue;
    auto info = read_small_file(proc + "/fdinfo/" + fd, 4096);
    if (!info) continue;
    const auto at = info->find("iff:");
    if (at == std::string::npos) continue;
    const auto start = info->find_first_not_of(" \t", at + 4);
    const auto end = info->find('\n', start);
    std::string name = info->substr(start, end == std::string::npos ? end : end - start);
    bool claimed = false;
    for (const auto& [id, nic] : d.nics) claimed = claimed || nic.tap == name;
    if (!claimed) found.push_back(std::move(name));
  }
  return found.size() == 1 ? found.front() : std::string();
}

// An interrupted hotplug that got as far as device_add: the device is in QEMU with everything
// below it, so the job is finished rather than undone (undoing would need a guest that answers
// the unplug, which a paused or booting one does not). The record takes the journaled request,
// the fdsets QEMU lists under the device's name, and the root port the flow took, which is the
// lowest one free in the journaled record, as it was then.
awaitable<bool> finish_add(Context& ctx, Domain& d, const Domain::PendingJob& job) {
  const std::string& id = job.target;
  if (job.kind == "nic-add") {
    auto spec = parse_nic(job.args);
    if (!spec) co_return false;
    NicState st;
    st.tap = spec->tap.empty() ? unclaimed_tap(d) : spec->tap;
    if (st.tap.empty()) co_return false;
    auto slot = d.allocate_slot(id);
    if (!slot) co_return false;
    st.spec = std::move(*spec);
    st.slot = *slot;
    d.nics[id] = std::move(st);
    co_return true;
  }
  if (job.kind != "disk-add") co_return false;
  auto spec = parse_disk(job.args);
  if (!spec) co_return false;
  qmp::Command query = qmp::cmd::query_fdsets();
  auto r = co_await call(ctx, d, std::move(query));
  if (!r) co_return false;
  auto sets = qmp::reply::fdsets(*r);
  if (!sets) co_return false;
  DiskState st;
  st.fdset = fdset_named(*sets, fdset_opaque(id));
  st.backing_fdset = spec->backing.empty() ? -1 : fdset_named(*sets, fdset_opaque(id + "-backing"));
  if (st.fdset < 0 || (!spec->backing.empty() && st.backing_fdset < 0)) co_return false;
  st.identity = co_await identity_in_qemu(ctx, d, st.fdset);
  if (spec->bus == DiskBus::virtio) {
    auto slot = d.allocate_slot(id);
    if (!slot) co_return false;
    st.slot = *slot;
  } else {
    st.slot = std::string(kScsiBus);
  }
  st.spec = std::move(*spec);
  d.disks[id] = std::move(st);
  co_return true;
}

// The SCSI controller an interrupted job plugged before the record said so.
awaitable<void> adopt_scsi_controller(Context& ctx, Domain& d) {
  if (d.scsi_controller || !co_await device_present(ctx, d, std::string(kScsiController))) co_return;
  auto slot = d.allocate_slot(std::string(kScsiController));
  if (!slot) {
    log::error("domain " + d.name() + ": " + slot.error().describe());
    co_return;
  }
  d.scsi_controller = true;
  d.scsi_slot = *slot;
}

// Finishes or undoes a job an earlier broker left half done. True for a removal: it is resumed as
// a job of its own once the domain is adopted (device_del again, wait for the guest, then the
// nodes and fds), so a device QEMU is still finalizing is never taken for gone. True too for a
// migration whose state had all gone: the destination is asked once the domain is adopted.
awaitable<bool> reconcile(Context& ctx, Domain& d, Domain::PendingJob job) {
  const std::string& id = job.target;
  log::warn("domain " + d.name() + ": finishing interrupted job " + job.kind + " " + id);
  if (job.kind.starts_with("cdrom-")) {
    co_await reconcile_medium(ctx, d, job);
    co_return false;
  }
  if (job.kind.starts_with("vnc-")) {
    co_await reconcile_vnc(ctx, d, job);
    co_return false;
  }
  if (job.kind == "save") {
    co_await recover_save(ctx, d, job.args);
    co_return false;
  }
  if (job.kind == "migrate") co_return co_await recover_migrate(ctx, d, job.args);
  if (job.kind == "live-update") {
    // The new QEMU, whose uid no record names, was reclaimed; the old one keeps running.
    put_back(d);
    co_await recover_save(ctx, d, job.args);
    co_return false;
  }
  if (id.empty()) co_return false;
  // A controller plugged on the way comes first: it took the lowest free root port.
  co_await adopt_scsi_controller(ctx, d);
  if (d.has_device(id)) co_return job.kind.ends_with("-remove");
  if (co_await device_present(ctx, d, id)) {
    if (co_await finish_add(ctx, d, job)) {
      log::info("domain " + d.name() + ": finished the interrupted " + job.kind + " " + id);
      co_return false;
    }
    if (!co_await unplug_added(ctx, d, id)) {
      log::error("domain " + d.name() + ": interrupted " + job.kind + " " + id +
                 ": the guest did not release the device; it stays plugged");
      co_return false;
    }
  }
  co_await remove_back_end(ctx, d, id);
  co_return false;
}

// A domain whose QEMU answered again: its run state from QEMU, the job it was in finished or
// undone, its record rewritten.
awaitable<void> settle(Context& ctx, Domains& domains, std::shared_ptr<Domain> d,
                       const ResumeRemoval& resume) {
  std::optional<Domain::PendingJob> removal;
  if (d->interrupted) {
    auto job = *d->interrupted;
    d->interrupted.reset();
    if (co_await reconcile(ctx, *d, job)) removal = job;
  }
  // What an interrupted job handed over and no device uses, and what QEMU kept while paused.
  if (auto ok = co_await collect_fdsets(*d, ctx.timeouts.qmp); !ok) {
    log::warn("domain " + d->name() + ": " + ok.error().describe());
  }
  qmp::Command query = qmp::cmd::query_status();
  auto st = co_await call(ctx, *d, std::move(query));
  bool running = false;
  if (st) {
    auto status = qmp::reply::status(*st);
    running = status && status->running;
  }
  if (d->state() == RunState::stopping) co_return;
  // The record is rewritten before the API shows the domain adopted: a client that sees it
  // running or paused never finds the old job in its record.
  const RunState was = d->state();
  const RunState now = running ? RunState::running : RunState::paused;
  d->set_state(now);
  auto written = domains.records().persist(*d);
  d->set_state(was);
  co_await std::move(written);
  if (d->state() == was) d->set_state(now);
  if (removal) resume({d->name(), *removal});
  ctx.events.publish(d->name(), "domain", "adopted",
                     {{"pid", d->instance().pid}, {"uid", d->instance().uid}});
}

// Tears down a recorded domain whose QEMU is gone, or whose create or destroy did not finish
// (`asked`: its log goes too).
awaitable<void> bury(Domains& domains, std::shared_ptr<Domain> d, std::string why, bool asked = false) {
  log::warn("domain " + d->name() + ": " + why + "; tearing down uid " +
            std::to_string(d->instance().uid));
  auto killed = co_await domains.teardown(d, false, asked);
  if (!killed) log::error("domain " + d->name() + ": " + killed.error().describe());
}

// Reconnects to an unresponsive domain's QEMU about once a second until it answers, dies, or the
// domain is destroyed (or taken over by a new one of the same name).
awaitable<void> keep_trying(Context& ctx, Domains& domains, std::shared_ptr<Domain> d,
                            const ResumeRemoval& resume) {
  for (;;) {
    asio::steady_timer pause(ctx.ex, std::chrono::seconds(1));
    co_await pause.async_wait(asio::as_tuple(asio::use_awaitable));
    auto current = domains.find(d->name());
    if (!current || *current != d || d->state() != RunState::unresponsive) co_return;
    if (!domains.alive(*d)) co_return co_await bury(domains, d, "QEMU exited while unresponsive");
    if (!co_await domains.reattach(d)) continue;
    log::info("domain " + d->name() + ": QEMU answers again; adopted");
    co_return co_await settle(ctx, domains, d, resume);
  }
}

enum class Adopted { adopted, torn_down, unresponsive };

// Files each domain's outcome in the report and wakes recover() after the last one.
struct OutcomeSink {
  RecoveryReport* report;
  std::string name;
  std::shared_ptr<std::size_t> pending;
  std::shared_ptr<asio::steady_timer> all_done;

  void operator()(std::exception_ptr e, Adopted how) {
    if (e) {
      log::error("domain " + name + ": recovery failed");
      how = Adopted::unresponsive;
    }
    auto& list = how == Adopted::adopted     ? report->adopted
                 : how == Adopted::torn_down ? report->torn_down
                                             : report->unresponsive;
    list.push_back(name);
    if (--*pending == 0) all_done->cancel();
  }
};

// Re-adopts one domain read back from its record (`alive`: its recorded QEMU still runs).
awaitable<Adopted> adopt(Context& ctx, Domains& domains, std::shared_ptr<Domain> d, bool alive,
                         const ResumeRemoval& resume) {
  if (d->destroying) {
    co_await bury(domains, d, "its destroy was interrupted", true);
    co_return Adopted::torn_down;
  }
  if (!alive) {
    co_await bury(domains, d, "QEMU is gone");
    co_return Adopted::torn_down;
  }
  // A create or restore that did not finish may have plugged some of its devices and not others:
  // it is undone whole, never adopted half made. The name is free for it to be retried.
  if (d->interrupted && (d->interrupted->kind == "create" || d->interrupted->kind == "restore" ||
                         d->interrupted->kind == "incoming")) {
    co_await bury(domains, d, "its " + d->interrupted->kind + " was interrupted", true);
    co_return Adopted::torn_down;
  }
  auto connected = co_await domains.reattach(d);
  // Only silence makes a live QEMU unresponsive; a refused or reset connection means it is going.
  const bool silent = !connected && (connected.error().code == qmp::errc::no_greeting ||
                                     connected.error().code == qmp::errc::timeout);
  if (!connected && (!silent || !domains.alive(*d))) {
    co_await bury(domains, d, connected.error().describe());
    co_return Adopted::torn_down;
  }
  if (!connected) {
    log::warn("domain " + d->name() + ": QEMU runs but does not answer (" +
              connected.error().describe() + "); adopted as unresponsive, retrying");
    d->set_state(RunState::unresponsive);
    ctx.events.publish(d->name(), "domain", "unresponsive", {{"pid", d->instance().pid}});
    asio::co_spawn(ctx.ex, keep_trying(ctx, domains, d, resume), asio::detached);
    co_return Adopted::unresponsive;
  }
  co_await settle(ctx, domains, d, resume);
  co_return Adopted::adopted;
}

}  // namespace

std::vector<Loaded> load(Domains& domains) {
  // Every record enters the table first, so the uid reclaim and the API see each of them at once;
  // the QEMU identity check (pid, start time, pidfd, cgroup) needs no QEMU answer.
  std::vector<Loaded> loaded;
  for (auto& record : domains.records().load()) {
    if (!record.domain) {
      log::error("domain record " + record.file + ": " + record.domain.error().describe());
      continue;
    }
    auto d = *record.domain;
    const bool alive = domains.still_running(*d);
    d->set_state(RunState::adopting);
    domains.insert(d);
    loaded.push_back({std::move(d), alive});
  }
  return loaded;
}

awaitable<RecoveryReport> adopt_all(Context& ctx, Domains& domains, std::vector<Loaded> loaded,
                                    const ResumeRemoval& resume) {
  RecoveryReport report;
  // Uids and cgroups no record speaks of (a start cut short by a crash) go too.
  report.reclaimed_uids = co_await domains.reclaim();

  // Each domain is adopted on its own; this waits for all, each bounded by the adopt timeout.
  auto pending = std::make_shared<std::size_t>(loaded.size());
  auto all_done = std::make_shared<asio::steady_timer>(ctx.ex, asio::steady_timer::time_point::max());
  for (auto& [d, alive] : loaded) {
    asio::co_spawn(ctx.ex, adopt(ctx, domains, d, alive, resume),
                   OutcomeSink{&report, d->name(), pending, all_done});
  }
  if (*pending > 0) co_await all_done->async_wait(asio::as_tuple(asio::use_awaitable));
  co_return report;
}

awaitable<RecoveryReport> recover(Context& ctx, Domains& domains, const ResumeRemoval& resume) {
  co_return co_await adopt_all(ctx, domains, load(domains), resume);
}

}  // namespace broker::flows
