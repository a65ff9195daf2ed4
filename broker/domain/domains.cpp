#include "broker/domain/domains.hpp"

#include <algorithm>
#include <array>
#include <set>

#include <sys/syscall.h>
#include <unistd.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/json/object.hpp>

#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/domain/blocking.hpp"
#include "broker/domain/fdsets.hpp"
#include "broker/lifecycle/proc.hpp"
#include "qmp/commands.hpp"

namespace broker {
namespace asio = boost::asio;
using asio::awaitable;

Domains::Domains(asio::any_io_executor ex, DomainsConfig config, lifecycle::Launcher& launcher,
                 EventBus& events)
    : ex_(ex),
      config_(std::move(config)),
      launcher_(launcher),
      events_(events),
      records_(ex, config_.records_dir),
      lifecycle_(std::max<std::size_t>(1, config_.parallel_lifecycle)),
      pool_(std::make_unique<WarmPool>(ex, *this, config_.pool)) {}

Domains::~Domains() { lifecycle_.join(); }

Result<std::shared_ptr<Domain>> Domains::find(const std::string& name) const {
  auto it = table_.find(name);
  if (it == table_.end()) {
    Error e(make_error_code(errc::not_found), "no domain named '" + name + "'");
    e.field = "name";
    return e;
  }
  return it->second;
}

Result<std::shared_ptr<Domain>> Domains::reserve(lifecycle::DomainSpec spec) {
  if (table_.contains(spec.name)) {
    Error e(make_error_code(errc::already_exists), "a domain named '" + spec.name + "' exists");
    e.field = "name";
    return e;
  }
  auto d = std::make_shared<Domain>(std::move(spec));
  table_[d->name()] = d;
  return d;
}

namespace {
// QEMU's last lines quoted in an error.
constexpr std::size_t kErrorLines = 5;
}  // namespace

awaitable<Result<void>> Domains::launch(std::shared_ptr<Domain> d, ColdPlan* plan,
                                        std::vector<std::string> extra_args) {
  Domain* raw = d.get();
  auto start = [this, raw, plan, &extra_args] {
    if (plan == nullptr) return launcher_.start(raw->spec(), nullptr, extra_args);
    std::vector<std::string> args = plan->args();
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    return launcher_.start(raw->spec(), &plan->fds(), args);
  };
  auto inst = co_await run_blocking(ex_, lifecycle_, std::move(start));
  if (!inst) {
    table_.erase(d->name());
    co_return inst.error();
  }
  d->instance() = std::move(*inst);
  start_log(*d, std::move(d->instance().log_pipe));
  // A QEMU no record speaks of would be reclaimed as an orphan by the next broker: it goes now.
  if (auto ok = co_await records_.persist(*d); !ok) {
    co_await teardown(d, false);
    co_return ok.error();
  }
  co_return Result<void>{};
}

awaitable<Result<bool>> Domains::launch_pooled(std::shared_ptr<Domain> d, PoolUse use) {
  if (!pool_->enabled()) co_return false;
  auto inst = pool_->take(d->spec(), use);
  if (!inst) co_return false;
  inst->trace.begin();
  lifecycle::Instance* raw = &*inst;
  const std::string name = d->name();
  const std::string* n = &name;
  auto& launcher = launcher_;
  auto handed = co_await run_blocking(ex_, lifecycle_, [&launcher, raw, n] { return launcher.hand_over(*raw, *n); });
  d->instance() = std::move(*inst);
  if (!handed) {
    // As a failed launch: the QEMU goes by uid, and with it the name (or, should the kill
    // fail, the domain stays, stopping, for the retries).
    Error e = handed.error();
    co_await teardown(d, false, true);
    co_return e;
  }
  d->instance().trace.mark("pool handover");
  start_log(*d, std::move(d->instance().log_pipe));
  if (auto ok = co_await records_.persist(*d); !ok) {
    co_await teardown(d, false, true);
    co_return ok.error();
  }
  co_return true;
}

awaitable<Result<void>> Domains::spawn_beside(std::shared_ptr<Domain> next,
                                              std::vector<std::string> extra_args) {
  Domain* raw = next.get();
  auto inst = co_await run_blocking(ex_, lifecycle_, [this, raw, &extra_args] {
    return launcher_.start(raw->spec(), nullptr, extra_args);
  });
  if (!inst) co_return inst.error();
  next->instance() = std::move(*inst);
  start_log(*next, std::move(next->instance().log_pipe));
  co_return Result<void>{};
}

awaitable<Result<void>> Domains::replace(std::shared_ptr<Domain> next) {
  table_[next->name()] = next;
  co_return co_await records_.persist(*next);
}

awaitable<Result<lifecycle::KillReport>> Domains::retire(std::shared_ptr<Domain> d) {
  d->set_state(RunState::stopping);  // its watch lets the connection go without a teardown
  if (d->qmp() != nullptr) d->qmp()->close();
  Domain* raw = d.get();
  auto report = co_await run_blocking(ex_, lifecycle_, [this, raw] { return launcher_.destroy(raw->instance()); });
  if (!report) co_return report.error();
  record_kill(*report);
  d->set_qmp(nullptr);
  if (d->log) d->log->close();
  launcher_.remove_log(d->instance().name);
  co_return report;
}

awaitable<Result<void>> Domains::attach(std::shared_ptr<Domain> d) {
  return connect(std::move(d), config_.session);
}

void Domains::start_log(Domain& d, fdpass::UniqueFd pipe) {
  const auto& inst = d.instance();
  d.log = std::make_shared<QemuLog>(ex_, std::move(pipe), inst.log_path, config_.log);
  d.log->start();
}

awaitable<Result<void>> Domains::reattach(std::shared_ptr<Domain> d) {
  if (!d->log) {
    const auto& inst = d->instance();
    auto pipe = QemuLog::reopen(launcher_.config().proc_root, inst.pid, inst.log_pipe_inode);
    if (pipe) start_log(*d, std::move(*pipe));
    else log::warn("domain " + d->name() + ": QEMU's output is not logged: " + pipe.error().describe());
  }
  SessionConfig session = config_.session;
  session.start_timeout = config_.adopt_timeout;
  return connect(std::move(d), std::move(session));
}

awaitable<Result<void>> Domains::connect(std::shared_ptr<Domain> d, SessionConfig session) {
  d->metrics = &metrics_;
  if (auto ok = co_await connect_qmp(ex_, *d, session); !ok) {
    Error e = ok.error();
    // A QEMU that exited before its greeting said why on stderr ("invalid kernel header").
    if (d->log) {
      d->log->drain();
      if (auto said = d->log->tail(kErrorLines); !said.empty()) e.message += "; QEMU said: " + said;
    }
    co_return e;
  }
  asio::co_spawn(ex_, watch(d), asio::detached);
  co_return Result<void>{};
}

namespace {

// Closes what QEMU held while the VM was not running, each time it resumes.
struct OnResume {
  asio::any_io_executor ex;
  Domains* domains;
  std::shared_ptr<Domain> d;
  void operator()() const {
    if (d->fdsets_to_close.empty()) return;
    asio::co_spawn(ex, domains->close_held_fdsets(d), asio::detached);
  }
};

}  // namespace

awaitable<Domains::RetryReport> Domains::retry_stuck() {
  RetryReport report;
  report.freed_uids = co_await run_blocking(ex_, lifecycle_, [this] { return launcher_.retry_quarantined(); });
  std::vector<std::shared_ptr<Domain>> stuck;
  for (const auto& [name, d] : table_) {
    if (d->teardown_failed) stuck.push_back(d);
  }
  for (auto& d : stuck) {
    if (!d->teardown_failed) continue;  // a DELETE retried it meanwhile
    if (auto ok = co_await teardown(d, false, d->destroying); ok) {
      log::info("domain " + d->name() + ": torn down on retry");
      report.torn_down.push_back(d->name());
    }
  }
  std::set<std::string> live;
  for (const auto& [name, d] : table_) live.insert(name);
  report.expired_logs = launcher_.expire_logs(live, config_.log_retention);
  co_return report;
}

awaitable<void> Domains::close_held_fdsets(std::shared_ptr<Domain> d) {
  auto changed = co_await broker::close_held_fdsets(*d, config_.qmp_timeout);
  if (!changed) {
    log::warn("domain " + d->name() + ": " + changed.error().describe());
    co_return;
  }
  if (!*changed || !contains(d->name())) co_return;
  if (auto ok = co_await records_.persist(*d); !ok) log::error(ok.error().describe());
}

awaitable<void> Domains::watch(std::shared_ptr<Domain> d) {
  std::function<void()> on_resume = OnResume{ex_, this, d};
  co_await pump_events(d, events_, std::move(on_resume));
  // The connection ended. Unless the broker asked for it, QEMU went away on its own: tear the
  // domain down by uid.
  auto current = table_.find(d->name());
  if (d->state() == RunState::stopping || current == table_.end() || current->second != d) co_return;
  const std::string uid = std::to_string(d->instance().uid);
  log::warn("domain " + d->name() + ": QEMU exited; tearing down uid " + uid,
            {{"DOMAIN", d->name()}, {"UID", uid}});
  auto report = co_await teardown(d, false);
  boost::json::object data;
  if (report) {
    data["killed"] = report->found;
    data["method"] = report->method;
  } else {
    data["error"] = report.error().describe();
  }
  events_.publish(d->name(), "domain", "exited", std::move(data));
}

awaitable<Result<lifecycle::KillReport>> Domains::teardown(std::shared_ptr<Domain> d, bool graceful,
                                                           bool asked) {
  d->set_state(RunState::stopping);
  if (graceful && d->qmp() != nullptr && d->qmp()->is_open()) {
    co_await d->qmp()->execute(qmp::cmd::quit(), qmp::after(config_.quit_timeout));
  }
  if (d->qmp() != nullptr) d->qmp()->close();
  Domain* raw = d.get();
  const bool retry = std::exchange(d->teardown_failed, false);
  auto report = co_await run_blocking(ex_, lifecycle_, [this, raw] { return launcher_.destroy(raw->instance()); });
  if (!report) {
    d->teardown_failed = true;
    // Said once; each retry that fails the same way only at debug level.
    const std::string what = "domain " + d->name() + ": teardown failed: " + report.error().describe();
    const std::string uid = std::to_string(d->instance().uid);
    if (retry) log::debug(what, {{"DOMAIN", d->name()}, {"UID", uid}});
    else log::error(what + "; retrying in the background", {{"DOMAIN", d->name()}, {"UID", uid}});
    co_return report.error();
  }
  record_kill(*report);
  d->set_qmp(nullptr);
  if (d->log) {
    d->log->drain();
    d->log->close();
  }
  if (asked) launcher_.remove_log(d->name());
  if (auto it = table_.find(d->name()); it != table_.end() && it->second == d) table_.erase(it);
  co_await records_.remove(d->name());
  co_return std::move(*report);
}

void Domains::record_kill(const lifecycle::KillReport& r) {
  metrics_.kill_report(r.survivors, static_cast<std::uint64_t>(std::max(r.rounds, 0)), r.duration);
}

metrics::Live Domains::metrics_live() const {
  constexpr RunState kStates[] = {RunState::starting, RunState::paused,   RunState::running,
                                  RunState::shutdown, RunState::stopping, RunState::adopting,
                                  RunState::unresponsive};
  std::array<std::size_t, std::size(kStates)> counts{};
  metrics::Live live;
  for (const auto& [name, d] : table_) {
    ++counts[static_cast<std::size_t>(d->state())];
    if (d->instance().uid != 0) ++live.uids_in_use;
  }
  live.uids_in_use += pool_->uids_held();
  live.pool_ready = pool_->size();
  for (auto s : kStates) live.domains_by_state.emplace_back(to_string(s), counts[static_cast<std::size_t>(s)]);
  return live;
}

bool Domains::still_running(Domain& d) {
  auto& inst = d.instance();
  const bool same = alive(d);
  if (same) inst.pidfd.reset(static_cast<int>(::syscall(SYS_pidfd_open, inst.pid, 0)));
  launcher_.reattach(inst);
  return same && inst.pidfd;
}

bool Domains::alive(const Domain& d) const {
  const auto& inst = d.instance();
  const auto& proc = launcher_.config().proc_root;
  if (inst.pid <= 0 || lifecycle::process_start_time(proc, inst.pid) != inst.start_time) return false;
  const char state = lifecycle::process_state(proc, inst.pid);
  return state != 0 && state != 'Z' && state != 'X';  // not dead, not a zombie
}

awaitable<std::vector<uid_t>> Domains::reclaim() {
  std::vector<const lifecycle::Instance*> live;
  for (const auto& [name, d] : table_) live.push_back(&d->instance());
  auto uids = co_await run_blocking(ex_, lifecycle_, [this, &live] { return launcher_.reclaim_uids(live); });
  launcher_.sweep_cgroups(live);
  co_return uids;
}

}  // namespace broker
