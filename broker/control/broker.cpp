#include "broker/domain/broker.hpp"

#include <sys/syscall.h>
#include <unistd.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json.hpp>

#include "broker/core/atomic_file.hpp"
#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/domain/state_file.hpp"
#include "broker/lifecycle/proc.hpp"
#include "fdpass/devices.hpp"
#include "qmp/commands.hpp"

namespace broker {
namespace asio = boost::asio;
namespace json = boost::json;
using asio::awaitable;
using asio::use_awaitable;

namespace {

Error from_qmp(const qmp::Error& e, std::string_view context) {
  Error out;
  switch (static_cast<qmp::errc>(e.code.value())) {
    case qmp::errc::command_failed: out.code = make_error_code(errc::qemu_error); break;
    case qmp::errc::timeout: out.code = make_error_code(errc::qemu_timeout); break;
    case qmp::errc::disconnected:
    case qmp::errc::closed: out.code = make_error_code(errc::qemu_gone); break;
    default: out.code = make_error_code(errc::internal); break;
  }
  if (e.code.category() != qmp::category()) out.code = make_error_code(errc::internal);
  out.message = std::string(context) + ": " + (e.message.empty() ? e.code.message() : e.message);
  out.qmp_class = e.qmp_class;
  out.qmp_desc = e.qmp_desc;
  return out;
}

std::string domains_dir(const BrokerConfig& c) { return c.records_dir; }

}  // namespace

json::object DomainInfo::to_json() const {
  json::object o;
  o["name"] = name;
  o["state"] = to_string(state);
  if (!qemu_status.empty()) o["qemu_status"] = qemu_status;
  o["uid"] = uid;
  o["pid"] = pid;
  o["accel"] = accel;
  o["job"] = job.empty() ? json::value(nullptr) : json::value(job);
  o["console"] = console;
  o["memory_mib"] = spec.memory_mib;
  o["vcpus"] = spec.vcpus;
  o["machine"] = lifecycle::to_string(spec.machine);
  o["devices"] = devices;
  return o;
}

Broker::Broker(asio::any_io_executor ex, BrokerConfig config, lifecycle::Launcher& launcher,
               const fdpass::ImageRoots& roots)
    : ex_(ex),
      config_(std::move(config)),
      launcher_(launcher),
      roots_(roots),
      events_(ex),
      flow_ctx_{ex, roots, events_, config_.timeouts} {
  make_dirs(domains_dir(config_));
}

Broker::~Broker() {
  pool_.join();
  state_writer_.join();
}

template <class F>
auto Broker::blocking(F&& f, asio::thread_pool* pool) -> awaitable<std::invoke_result_t<F&>> {
  // `f` runs on `pool` (the lifecycle thread unless said otherwise); it wakes this coroutine by
  // posting a timer cancel back to the broker's executor. The result lives in this frame, which
  // outlives the wait. `f` is taken by reference (the caller's temporary lives until the
  // co_await completes) and moved into the posted handler before the first suspension. Callers
  // pass closures of pointers only: g++ 12 mis-copies closures with non-trivial members that are
  // created inside a coroutine.
  std::optional<std::invoke_result_t<F&>> result;
  auto done = std::make_shared<asio::steady_timer>(ex_, asio::steady_timer::time_point::max());
  asio::post(pool != nullptr ? *pool : pool_, [&result, f = std::forward<F>(f), done, ex = ex_]() mutable {
    result.emplace(f());
    asio::post(ex, [done] { done->cancel(); });
  });
  co_await done->async_wait(asio::as_tuple(use_awaitable));
  co_return std::move(*result);
}

Result<std::shared_ptr<Domain>> Broker::find(const std::string& name) const {
  auto it = domains_.find(name);
  if (it == domains_.end()) {
    Error e(make_error_code(errc::not_found), "no domain named '" + name + "'");
    e.field = "name";
    return e;
  }
  return it->second;
}

// A domain's record describes a running QEMU and the job it is in. It must survive a crash of the
// broker, which the page cache guarantees once write() and rename() return. It need not survive
// a crash of the host (qbrokerd keeps it on /run): that ends every QEMU too, and a restarted
// broker kills and releases each uid recorded in STATE/uids (fsynced) that no record accounts
// for. So no fsync sits in a job's path.
constexpr Sync kStateSync = Sync::process;

awaitable<void> Broker::persist(const Domain& d) {
  struct Write {
    std::string dir, file, text;
  } w{domains_dir(config_), d.name() + ".json", json::serialize(state_to_json(d))};
  Write* p = &w;
  auto ec = co_await blocking(
      [p] { return write_file_atomic(p->dir, p->file, p->text, 0600, kStateSync); }, &state_writer_);
  if (ec) log::error("domain " + d.name() + ": cannot write state: " + ec.message());
}

awaitable<void> Broker::forget(const std::string& name) {
  domains_.erase(name);
  struct Remove {
    std::string dir, file;
  } r{domains_dir(config_), name + ".json"};
  Remove* p = &r;
  auto ec = co_await blocking([p] { return remove_file_durable(p->dir, p->file, kStateSync); },
                              &state_writer_);
  if (ec) log::error("domain " + name + ": cannot remove state: " + ec.message());
}

awaitable<Result<json::value>> Broker::qmp_call(Domain& d, qmp::Command c) {
  if (d.qmp() == nullptr) {
    co_return Error(make_error_code(errc::qemu_gone), "domain " + d.name() + " has no QEMU");
  }
  std::string what = c.name;
  auto r = co_await d.qmp()->execute(std::move(c), qmp::after(config_.timeouts.qmp));
  if (!r) co_return from_qmp(r.error(), what);
  co_return std::move(*r);
}

awaitable<Result<void>> Broker::connect_qmp(Domain& d) {
  auto sock = fdpass::connect_unix(d.instance().qmp_path);
  if (!sock) co_return make_error(sock.error(), "connecting to QMP at " + d.instance().qmp_path);
  qmp::ClientOptions opts;
  opts.limits.max_line = config_.qmp_max_line;
  if (config_.transcript) {
    opts.transcript = [hook = config_.transcript](qmp::Direction dir, std::string_view line,
                                                   bool fd) { hook(dir, line, fd); };
  }
  auto client = co_await qmp::Client::connect(ex_, std::move(*sock),
                                              qmp::after(config_.start_timeout), std::move(opts));
  if (!client) co_return from_qmp(client.error(), "QMP handshake");
  d.set_qmp(std::move(*client));
  co_return Result<void>{};
}

awaitable<void> Broker::pump_events(std::shared_ptr<Domain> d) {
  qmp::Client* client = d->qmp();
  if (client == nullptr) co_return;
  auto sub = client->subscribe({.capacity = 256});
  for (;;) {
    auto ev = co_await sub.next(qmp::after(std::chrono::hours(24)));
    if (!ev) {
      if (ev.error().code == qmp::errc::timeout) continue;
      break;  // disconnected: QEMU is gone (or the domain is being destroyed)
    }
    if (ev->name == qmp::event::kStop) d->set_state(RunState::paused);
    if (ev->name == qmp::event::kResume) d->set_state(RunState::running);
    if (ev->name == qmp::event::kShutdown) d->set_state(RunState::shutdown);
    events_.publish(d->name(), "qemu", ev->name, ev->data);
  }
  // QEMU went away without being asked to: tear the domain down by uid.
  if (d->state() == RunState::stopping || !domains_.contains(d->name()) ||
      domains_.at(d->name()) != d) {
    co_return;
  }
  log::warn("domain " + d->name() + ": QEMU exited; tearing down uid " +
            std::to_string(d->instance().uid));
  auto report = co_await teardown(d, false);
  json::object data;
  if (report) {
    data["killed"] = report->found;
    data["method"] = report->method;
  } else {
    data["error"] = report.error().describe();
  }
  events_.publish(d->name(), "domain", "exited", std::move(data));
}

awaitable<Result<lifecycle::KillReport>> Broker::teardown(std::shared_ptr<Domain> d, bool graceful) {
  d->set_state(RunState::stopping);
  if (graceful && d->qmp() != nullptr && d->qmp()->is_open()) {
    co_await d->qmp()->execute(qmp::cmd::quit(), qmp::after(config_.quit_timeout));
  }
  if (d->qmp() != nullptr) d->qmp()->close();
  Domain* raw = d.get();  // closures handed to blocking() hold only trivially copyable state
  auto report = co_await blocking([this, raw] { return launcher_.destroy(raw->instance()); });
  if (!report) {
    log::error("domain " + d->name() + ": teardown failed: " + report.error().describe());
    co_return report.error();
  }
  d->set_qmp(nullptr);
  co_await forget(d->name());
  co_return std::move(*report);
}

awaitable<Result<DomainInfo>> Broker::create(CreateDomain request) {
  const std::string name = request.spec.name;
  if (domains_.contains(name)) {
    Error e(make_error_code(errc::already_exists), "a domain named '" + name + "' exists");
    e.field = "name";
    co_return e;
  }
  auto d = std::make_shared<Domain>(request.spec);
  domains_[name] = d;  // reserves the name while starting
  auto job = d->begin_job("create");
  events_.publish(name, "domain", "starting");

  Domain* raw = d.get();
  auto inst = co_await blocking([this, raw] { return launcher_.start(raw->spec()); });
  if (!inst) {
    domains_.erase(name);
    co_return inst.error();
  }
  d->instance() = std::move(*inst);
  co_await persist(*d);

  auto fail = [&](Error e) -> awaitable<Result<DomainInfo>> {
    co_await teardown(d, false);
    domains_.erase(name);
    events_.publish(name, "domain", "failed", {{"error", e.describe()}});
    co_return e;
  };
  if (auto ok = co_await connect_qmp(*d); !ok) co_return co_await fail(ok.error());
  d->set_state(RunState::paused);
  asio::co_spawn(ex_, pump_events(d), asio::detached);

  // Devices go in while the guest has not run yet, through the same flows as hotplug.
  for (auto& cd : request.cdroms) {
    std::string path = cd.path;
    std::string id = cd.id;
    auto ok = co_await flows::add_cdrom_drive(flow_ctx_, *d, std::move(cd));
    if (!ok) co_return co_await fail(ok.error());
    if (!path.empty()) {
      InsertMedium medium{path, false};
      ok = co_await flows::insert_medium(flow_ctx_, *d, id, std::move(medium));
      if (!ok) co_return co_await fail(ok.error());
    }
  }
  for (auto& disk : request.disks) {
    auto ok = co_await flows::add_disk(flow_ctx_, *d, std::move(disk));
    if (!ok) co_return co_await fail(ok.error());
  }
  for (auto& nic : request.nics) {
    auto ok = co_await flows::add_nic(flow_ctx_, *d, std::move(nic));
    if (!ok) co_return co_await fail(ok.error());
  }
  if (request.vnc) {
    auto ok = co_await flows::set_vnc(flow_ctx_, *d, std::move(*request.vnc));
    if (!ok) co_return co_await fail(ok.error());
  }
  if (!request.spec.paused) {
    auto ok = co_await qmp_call(*d, qmp::cmd::cont());
    if (!ok) co_return co_await fail(ok.error());
    d->set_state(RunState::running);
  }
  co_await persist(*d);
  events_.publish(name, "domain", "created",
                  {{"uid", d->instance().uid}, {"pid", d->instance().pid}});
  co_return co_await info(name, false);
}

awaitable<Result<lifecycle::KillReport>> Broker::destroy(std::string name, bool graceful) {
  auto d = find(name);
  if (!d) co_return d.error();
  if ((*d)->state() == RunState::stopping) {
    co_return Error(make_error_code(errc::busy), "domain " + name + " is already being destroyed");
  }
  auto report = co_await teardown(*d, graceful);
  if (report) {
    events_.publish(name, "domain", "destroyed",
                    {{"killed", report->found},
                     {"method", report->method},
                     {"duration_us", report->duration.count()}});
  }
  co_return report;
}

awaitable<Result<DomainInfo>> Broker::info(std::string name, bool live) {
  auto found = find(name);
  if (!found) co_return found.error();
  auto d = *found;
  DomainInfo i = describe(*d);
  if (live && d->qmp() != nullptr) {
    auto st = co_await qmp_call(*d, qmp::cmd::query_status());
    if (!st) co_return st.error();
    auto s = qmp::reply::status(*st);
    if (s) i.qemu_status = s->status;
  }
  co_return i;
}

std::vector<DomainInfo> Broker::list() const {
  std::vector<DomainInfo> out;
  for (const auto& [name, d] : domains_) out.push_back(describe(*d));
  return out;
}

DomainInfo Broker::describe(const Domain& d) {
  DomainInfo i;
  i.name = d.name();
  i.state = d.state();
  i.uid = d.instance().uid;
  i.pid = d.instance().pid;
  i.accel = lifecycle::to_string(d.instance().accel);
  i.job = d.job();
  i.console = d.instance().console_path;
  i.spec = d.spec();
  i.devices = d.devices_json();
  return i;
}

template <class T, class F>
awaitable<Result<T>> Broker::run_job(std::string name, std::string job, std::string target,
                                     Journal journal, F flow) {
  auto found = find(name);
  if (!found) co_return found.error();
  auto d = *found;
  if (d->state() == RunState::starting || d->state() == RunState::stopping) {
    co_return Error(make_error_code(errc::wrong_state),
                    "domain " + name + " is " + std::string(to_string(d->state())));
  }
  auto guard = d->begin_job(job, target);
  if (!guard) co_return guard.error();
  // Journal the job before the first step, so a broker killed mid-flow can finish or undo it.
  if (journal == Journal::around) co_await persist(*d);
  events_.publish(name, "job", "started", {{"job", job}, {"target", target}});
  Result<T> r = co_await flow(*d);
  guard->release();
  if (journal != Journal::none && domains_.contains(name)) co_await persist(*d);
  json::object data{{"job", job}, {"ok", r.has_value()}};
  if (!r) data["error"] = r.error().describe();
  events_.publish(name, "job", "finished", std::move(data));
  co_return r;
}

awaitable<Result<void>> Broker::command_job(std::string name, std::string job, qmp::Command command,
                                            std::optional<RunState> refused_in,
                                            std::optional<RunState> after) {
  qmp::Command* cmd = &command;  // lives in this frame until the job is done
  auto step = [this, cmd, refused_in, after](Domain& d) -> awaitable<Result<void>> {
    if (refused_in && d.state() == *refused_in) {
      co_return Error(make_error_code(errc::wrong_state),
                      "domain " + d.name() + " is already " + std::string(to_string(*refused_in)));
    }
    auto r = co_await qmp_call(d, std::move(*cmd));
    if (!r) co_return r.error();
    if (after) d.set_state(*after);
    co_return Result<void>{};
  };
  co_return co_await run_job<void>(std::move(name), std::move(job), {}, Journal::none, step);
}

awaitable<Result<void>> Broker::pause(std::string name) {
  co_return co_await command_job(std::move(name), "pause", qmp::cmd::stop(), RunState::paused,
                                 RunState::paused);
}

awaitable<Result<void>> Broker::resume(std::string name) {
  co_return co_await command_job(std::move(name), "resume", qmp::cmd::cont(), RunState::running,
                                 RunState::running);
}

awaitable<Result<void>> Broker::shutdown(std::string name) {
  co_return co_await command_job(std::move(name), "shutdown", qmp::cmd::system_powerdown(),
                                 std::nullopt, std::nullopt);
}

awaitable<Result<void>> Broker::reset(std::string name) {
  co_return co_await command_job(std::move(name), "reset", qmp::cmd::system_reset(), std::nullopt,
                                 std::nullopt);
}

template <class T, class... Args>
awaitable<Result<T>> Broker::device_job(std::string name, std::string job, std::string target,
                                        Journal journal,
                                        awaitable<Result<T>> (*flow)(flows::Context&, Domain&, Args...),
                                        Args... args) {
  return run_job<T>(std::move(name), std::move(job), std::move(target), journal,
                    [this, flow, ... args = std::move(args)](Domain& d) {
                      return flow(flow_ctx_, d, args...);
                    });
}

awaitable<Result<void>> Broker::insert_medium(std::string name, std::string cdrom, InsertMedium m) {
  std::string target = cdrom;
  return device_job(std::move(name), "cdrom-insert", std::move(target), Journal::after,
                    &flows::insert_medium,
                    std::move(cdrom), std::move(m));
}

awaitable<Result<void>> Broker::eject_medium(std::string name, std::string cdrom, bool force) {
  std::string target = cdrom;
  return device_job(std::move(name), "cdrom-eject", std::move(target), Journal::after,
                    &flows::eject_medium,
                    std::move(cdrom), force);
}

awaitable<Result<void>> Broker::add_disk(std::string name, DiskSpec disk) {
  std::string target = disk.id;
  return device_job(std::move(name), "disk-add", std::move(target), Journal::around,
                    &flows::add_disk, std::move(disk));
}

awaitable<Result<void>> Broker::remove_disk(std::string name, std::string id, ProgressFn progress) {
  std::string target = id;
  return device_job(std::move(name), "disk-remove", std::move(target), Journal::around,
                    &flows::remove_disk,
                    std::move(id), std::move(progress));
}

awaitable<Result<void>> Broker::add_nic(std::string name, NicSpec nic) {
  std::string target = nic.id;
  return device_job(std::move(name), "nic-add", std::move(target), Journal::around,
                    &flows::add_nic, std::move(nic));
}

awaitable<Result<void>> Broker::remove_nic(std::string name, std::string id, ProgressFn progress) {
  std::string target = id;
  return device_job(std::move(name), "nic-remove", std::move(target), Journal::around,
                    &flows::remove_nic,
                    std::move(id), std::move(progress));
}

awaitable<Result<VncState>> Broker::set_vnc(std::string name, VncSpec vnc) {
  return device_job(std::move(name), "vnc-set", "vnc", Journal::after, &flows::set_vnc, std::move(vnc));
}

awaitable<Result<void>> Broker::remove_vnc(std::string name) {
  return device_job(std::move(name), "vnc-remove", "vnc", Journal::after, &flows::remove_vnc);
}

awaitable<Result<void>> Broker::save(std::string name, std::string, ProgressFn) {
  if (auto d = find(name); !d) co_return d.error();
  co_return Error(make_error_code(errc::not_implemented), "save is not implemented yet");
}

awaitable<Result<DomainInfo>> Broker::restore(RestoreRequest, ProgressFn) {
  co_return Error(make_error_code(errc::not_implemented), "restore is not implemented yet");
}

awaitable<Result<void>> Broker::migrate(std::string name, std::string, ProgressFn) {
  if (auto d = find(name); !d) co_return d.error();
  co_return Error(make_error_code(errc::not_implemented), "live migration is not implemented yet");
}

awaitable<Result<Broker::QemuCapabilities>> Broker::qemu_capabilities() {
  auto binary = qmp::BinaryId::of(launcher_.config().qemu);
  if (!binary) co_return from_qmp(binary.error(), "QEMU binary " + launcher_.config().qemu);
  if (auto cached = capabilities_.find(*binary)) {
    co_return QemuCapabilities{cached, capabilities_from_};
  }
  Error last(make_error_code(errc::qemu_gone), "no domain runs a QEMU to probe");
  // A copy: domains may come and go while a probe waits (each is kept alive by its pointer).
  std::vector<std::shared_ptr<Domain>> candidates;
  for (const auto& [name, d] : domains_) {
    if (d->state() == RunState::running || d->state() == RunState::paused) candidates.push_back(d);
  }
  for (const auto& d : candidates) {
    if (d->qmp() == nullptr || !d->qmp()->is_open()) continue;
    const std::string from = d->name();
    auto caps = co_await capabilities_.get(*binary, *d->qmp(), qmp::after(config_.timeouts.qmp * 3));
    if (!caps) {
      last = from_qmp(caps.error(), "probing QEMU through domain " + from);
      log::warn(last.describe());
      continue;
    }
    capabilities_from_ = from;
    co_return QemuCapabilities{*caps, from};
  }
  co_return last;
}

awaitable<Result<json::value>> Broker::qmp_passthrough(std::string name, json::value command) {
  auto found = find(name);
  if (!found) co_return found.error();
  if (!command.is_object()) co_return field_error("body", "must be a QMP command object");
  const auto& o = command.get_object();
  for (const auto& kv : o) {
    if (kv.key() != "execute" && kv.key() != "arguments") {
      co_return field_error(kv.key(), "unknown field (QMP commands have execute and arguments)");
    }
  }
  auto exec = o.find("execute");
  if (exec == o.end() || !exec->value().is_string()) {
    co_return field_error("execute", "must be the name of a QMP command");
  }
  std::string cmd_name(exec->value().get_string());
  if (qmp::cmd::is_fd_command(cmd_name) || cmd_name == "qmp_capabilities") {
    co_return Error(make_error_code(errc::forbidden),
                    "'" + cmd_name + "' is not allowed through the passthrough: the broker owns fds");
  }
  json::object args;
  if (auto a = o.find("arguments"); a != o.end()) {
    if (!a->value().is_object()) co_return field_error("arguments", "must be an object");
    args = a->value().get_object();
  }
  co_return co_await qmp_call(**found, qmp::cmd::raw(cmd_name, std::move(args)));
}

awaitable<bool> Broker::reconcile(Domain& d, Domain::PendingJob job) {
  // The device naming of broker/domain/domain.hpp tells what a flow may have left in QEMU.
  const std::string& id = job.target;
  log::warn("domain " + d.name() + ": finishing interrupted job " + job.kind + " " + id);
  if (job.kind.rfind("cdrom-", 0) == 0 || job.kind.rfind("vnc-", 0) == 0 || id.empty()) {
    // Media changes and display handovers are complete or absent as QEMU reports them; the
    // next query shows the truth, and nothing of theirs outlives the monitor but in-use fds.
    co_return false;
  }
  bool committed = d.has_device(id);
  auto peripherals = co_await qmp_call(d, qmp::cmd::qom_list("/machine/peripheral"));
  bool present = false;
  if (peripherals) {
    if (auto props = qmp::reply::qom_list(*peripherals)) {
      for (const auto& p : *props) present = present || p.name == id;
    }
  }
  const bool adding = job.kind.ends_with("-add");
  if (committed && present) co_return true;  // an interrupted removal: it goes on as a job
  if (!committed && present && adding) {
    // An interrupted addition reached device_add: take the device out again.
    auto sub = d.qmp()->subscribe();
    if (co_await qmp_call(d, qmp::cmd::device_del(id))) {
      auto gone = co_await sub.wait_for(qmp::event::device_deleted(id),
                                        qmp::after(config_.timeouts.unplug));
      if (!gone) {
        log::error("domain " + d.name() + ": interrupted " + job.kind + " " + id +
                   ": the guest did not release the device; it stays plugged");
        co_return false;
      }
    }
  }
  // Whatever lies below the device: format and file nodes, netdev, passed fds, fdsets.
  for (const char* suffix : {"-fmt", "-file", "-backing", "-backing-file"}) {
    co_await qmp_call(d, qmp::cmd::blockdev_del("qb-" + id + suffix));
  }
  co_await qmp_call(d, qmp::cmd::netdev_del("qb-net-" + id));
  co_await qmp_call(d, qmp::cmd::closefd("qb-tap-" + id));
  if (auto sets = co_await qmp_call(d, qmp::cmd::query_fdsets())) {
    if (auto fdsets = qmp::reply::fdsets(*sets)) {
      for (const auto& set : *fdsets) {
        for (const auto& fd : set.fds) {
          if (fd.opaque == "qb:" + id) co_await qmp_call(d, qmp::cmd::remove_fd(set.fdset_id, fd.fd));
        }
      }
    }
  }
  if (committed) {  // an interrupted removal that got past device_del: finish it
    if (auto it = d.disks.find(id); it != d.disks.end()) {
      if (!it->second.slot.empty()) d.free_slot(it->second.slot);
      d.disks.erase(it);
    }
    if (auto it = d.nics.find(id); it != d.nics.end()) {
      if (!it->second.slot.empty()) d.free_slot(it->second.slot);
      d.nics.erase(it);
    }
  }
  co_return false;
}

awaitable<void> Broker::resume_removal(std::string name, Domain::PendingJob job) {
  // device_del again: QEMU answers that the unplug is under way (or starts it), and the flow
  // waits for the guest and frees what is left, as if the first broker had lived.
  ProgressFn none;
  Result<void> r = Error(make_error_code(errc::internal), "not a removal: " + job.kind);
  if (job.kind == "disk-remove") r = co_await remove_disk(name, job.target, none);
  if (job.kind == "nic-remove") r = co_await remove_nic(name, job.target, none);
  if (r) {
    log::info("domain " + name + ": finished the interrupted " + job.kind + " " + job.target);
  } else {
    log::error("domain " + name + ": interrupted " + job.kind + " " + job.target + ": " +
               r.error().describe() + "; retry the removal");
  }
}

awaitable<Broker::RecoveryReport> Broker::recover() {
  RecoveryReport report;
  for (const auto& file : list_dir(domains_dir(config_))) {
    if (file.size() < 6 || file.substr(file.size() - 5) != ".json") continue;
    auto text = read_small_file(domains_dir(config_) + "/" + file);
    std::error_code ec;
    json::value v = text ? json::parse(*text, ec) : json::value();
    auto restored = (!text || ec) ? Result<std::shared_ptr<Domain>>(Error(
                                        make_error_code(errc::internal), "unreadable state file"))
                                  : domain_from_json(v);
    if (!restored) {
      log::error("state file " + file + ": " + restored.error().describe());
      continue;
    }
    auto d = *restored;
    const auto& inst = d->instance();
    bool same = inst.pid > 0 &&
                lifecycle::process_start_time(launcher_.config().proc_root, inst.pid) ==
                    inst.start_time;
    if (same) {
      d->instance().pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, inst.pid, 0)));
    }
    launcher_.reattach(d->instance());
    domains_[d->name()] = d;
    Result<void> connected = Error(make_error_code(errc::qemu_gone), "QEMU is gone");
    if (same && d->instance().pidfd) connected = co_await connect_qmp(*d);
    if (!connected) {
      log::warn("domain " + d->name() + ": " + connected.error().describe() + "; tearing down uid " +
                std::to_string(inst.uid));
      auto killed = co_await teardown(d, false);
      if (!killed) log::error("domain " + d->name() + ": " + killed.error().describe());
      report.torn_down.push_back(d->name());
      continue;
    }
    auto st = co_await qmp_call(*d, qmp::cmd::query_status());
    bool running = false;
    if (st) {
      auto s = qmp::reply::status(*st);
      running = s && s->running;
    }
    d->set_state(running ? RunState::running : RunState::paused);
    asio::co_spawn(ex_, pump_events(d), asio::detached);
    if (d->interrupted) {
      auto job = *d->interrupted;
      d->interrupted.reset();
      const bool resume = co_await reconcile(*d, job);
      co_await persist(*d);
      if (resume) asio::co_spawn(ex_, resume_removal(d->name(), job), asio::detached);
    }
    report.adopted.push_back(d->name());
    events_.publish(d->name(), "domain", "adopted", {{"pid", inst.pid}, {"uid", inst.uid}});
  }
  // Uids and cgroups no state file speaks of (a start cut short by a crash) go too.
  std::vector<const lifecycle::Instance*> live;
  for (const auto& [name, d] : domains_) live.push_back(&d->instance());
  auto* lp = &live;
  report.reclaimed_uids = co_await blocking([this, lp] { return launcher_.reclaim_uids(*lp); });
  launcher_.sweep_cgroups(live);
  co_return report;
}

}  // namespace broker
