#include "broker/api/service.hpp"

#include <boost/json.hpp>

#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "qmp/capabilities.hpp"
#include "qmp/commands.hpp"

namespace broker::api {
namespace asio = boost::asio;
namespace json = boost::json;
using asio::awaitable;

namespace {

// Publishes a job's progress on the event bus, where GET /v1/events (and qbrokerctl's progress
// bar) see it, and keeps it for GET /v1/domains (qbrokerctl top). Captures only pointers (g++ 12
// mis-copies closures with non-trivial members inside coroutines); `name` lives in the awaiting
// Service frame for the whole job.
ProgressFn progress_to_bus(Broker* broker, const std::string* name, const char* job) {
  return [broker, name, job](double fraction, std::string_view phase) {
    broker->note_progress(*name, fraction, phase);
    broker->events().publish(*name, "job", "progress",
                             {{"job", job}, {"fraction", fraction}, {"phase", phase}});
  };
}

json::object capabilities_json(const qmp::Capabilities& c) {
  return json::object{
      {"display_update_vnc_fd", c.display_update_vnc_fd},
      {"run_with", c.run_with},
      {"run_with_user", c.run_with_user},
      {"fdset_explicit_remove", c.fdset_explicit_remove},
      {"file_migration_fdset", c.file_migration_fdset},
      {"change_medium", json::object{{"id", c.change_medium.id},
                                     {"device", c.change_medium.device},
                                     {"read_only_mode", c.change_medium.read_only_mode},
                                     {"force", c.change_medium.force}}},
      {"commands", c.commands.size()},
      {"events", c.events.size()},
  };
}

}  // namespace

awaitable<Outcome> Service::execute(Command command) {
  co_return co_await std::visit([this](auto& c) { return run(c); }, command);
}

awaitable<Outcome> Service::done(const Result<void>& r, const std::string& name,
                                 http::status status) {
  if (!r) co_return failure(r.error());
  co_return co_await current(name, status);
}

awaitable<Outcome> Service::current(const std::string& name, http::status status) {
  auto info = co_await broker_.info(name, false);
  if (!info) co_return failure(info.error());
  co_return domain_outcome(*info, status);
}

awaitable<Outcome> Service::run(GetVersion&) {
  json::object q{{"binary", config_.qemu_binary}};
  auto probed = co_await broker_.qemu_capabilities();
  if (probed) {
    const auto& caps = *probed->caps;
    q["version"] = caps.version.to_string();
    q["package"] = caps.version.package;
    q["capabilities"] = capabilities_json(caps);
    q["probed_from"] = probed->probed_from;
  } else {
    q["version"] = nullptr;
    q["capabilities"] = nullptr;
    q["note"] = "QEMU is probed over QMP once a domain runs: " + probed.error().describe();
  }
  co_return version_outcome(std::move(q));
}

awaitable<Outcome> Service::run(ListDomains& c) {
  co_return domains_outcome(broker_.list(c.usage));
}

awaitable<Outcome> Service::run(CreateDomainCmd& c) {
  std::string name = c.request.spec.name;
  auto info = co_await broker_.create(std::move(c.request));
  if (!info) co_return failure(info.error());
  // create() describes the domain while its "create" job still holds the slot; the answer
  // shows the domain as the client will find it.
  auto now = co_await broker_.info(name, false);
  co_return domain_outcome(now ? *now : *info, http::status::created);
}

awaitable<Outcome> Service::run(GetDomain& c) {
  auto info = co_await broker_.info(c.name, c.live);
  if (!info) co_return failure(info.error());
  co_return domain_outcome(*info);
}

awaitable<Outcome> Service::run(DestroyDomain& c) {
  auto report = co_await broker_.destroy(c.name, c.graceful, c.purge_nvram);
  if (!report) co_return failure(report.error());
  co_return kill_outcome(c.name, *report);
}

awaitable<Outcome> Service::run(RunStateCmd& c) {
  Result<void> r;
  switch (c.op) {
    case RunOp::pause:
      r = co_await broker_.pause(c.name);
      break;
    case RunOp::resume:
      r = co_await broker_.resume(c.name);
      break;
    case RunOp::shutdown:
      r = co_await broker_.shutdown(c.name);
      break;
    case RunOp::reset:
      r = co_await broker_.reset(c.name);
      break;
  }
  if (!r) co_return failure(r.error());
  co_return co_await current(c.name);
}

awaitable<Outcome> Service::run(InsertMediumCmd& c) {
  auto r = co_await broker_.insert_medium(c.name, c.cdrom, std::move(c.medium));
  co_return co_await done(r, c.name);
}

awaitable<Outcome> Service::run(EjectMediumCmd& c) {
  auto r = co_await broker_.eject_medium(c.name, c.cdrom, c.force);
  co_return co_await done(r, c.name);
}

awaitable<Outcome> Service::run(AddDiskCmd& c) {
  auto r = co_await broker_.add_disk(c.name, std::move(c.disk));
  co_return co_await done(r, c.name, http::status::created);
}

awaitable<Outcome> Service::run(RemoveDiskCmd& c) {
  auto r = co_await broker_.remove_disk(c.name, c.id,
                                        progress_to_bus(&broker_, &c.name, "disk-remove"));
  co_return co_await done(r, c.name);
}

awaitable<Outcome> Service::run(AddNicCmd& c) {
  auto r = co_await broker_.add_nic(c.name, std::move(c.nic));
  co_return co_await done(r, c.name, http::status::created);
}

awaitable<Outcome> Service::run(RemoveNicCmd& c) {
  auto r = co_await broker_.remove_nic(c.name, c.id,
                                       progress_to_bus(&broker_, &c.name, "nic-remove"));
  co_return co_await done(r, c.name);
}

awaitable<Outcome> Service::run(SetVncCmd& c) {
  auto r = co_await broker_.set_vnc(c.name, std::move(c.vnc));
  if (!r) co_return failure(r.error());
  co_return vnc_outcome(c.name, *r);
}

awaitable<Outcome> Service::run(RemoveVncCmd& c) {
  auto r = co_await broker_.remove_vnc(c.name);
  co_return co_await done(r, c.name);
}

awaitable<Outcome> Service::run(SaveCmd& c) {
  const bool kept = c.request.keep_running;
  const std::string path = c.request.path;
  auto r = co_await broker_.save(c.name, std::move(c.request));
  if (!r) co_return failure(r.error());
  Outcome o;
  o.body = json::object{{"name", c.name}, {"saved", path}, {"destroyed", !kept}};
  co_return o;
}

awaitable<Outcome> Service::run(RestoreCmd& c) {
  auto r = co_await broker_.restore(std::move(c.request));
  if (!r) co_return failure(r.error());
  co_return domain_outcome(*r, http::status::created);
}

awaitable<Outcome> Service::run(CancelJobCmd& c) {
  auto job = co_await broker_.cancel_job(c.name);
  if (!job) co_return failure(job.error());
  Outcome o;
  o.status = http::status::accepted;
  o.body = json::object{{"name", c.name}, {"job", *job}, {"cancelling", true}};
  co_return o;
}

awaitable<Outcome> Service::run(MigrateCmd& c) {
  const std::string to = c.request.to;
  auto r = co_await broker_.migrate(c.name, std::move(c.request),
                                    progress_to_bus(&broker_, &c.name, "migrate"));
  if (!r) co_return failure(r.error());
  Outcome o;
  o.body = json::object{{"name", c.name}, {"migrated_to", to}};
  co_return o;
}

awaitable<Outcome> Service::run(IncomingCmd& c) {
  auto r = co_await broker_.incoming(std::move(c.request.domain), c.request.paused,
                                     c.request.copy_storage, true);
  if (!r) co_return failure(r.error());
  Outcome o;
  o.status = http::status::created;
  o.body = json::object{{"name", r->name}, {"token", r->token}, {"endpoint", r->endpoint}};
  if (!r->nbd.empty()) o.body.as_object()["nbd"] = r->nbd;
  co_return o;
}

awaitable<Outcome> Service::run(QmpCmd& c) {
  auto r = co_await broker_.qmp_passthrough(c.name, std::move(c.command));
  if (!r) co_return failure(r.error());
  co_return qmp_outcome(std::move(*r));
}

awaitable<Outcome> Service::run(GetMetrics&) {
  co_return metrics_outcome(broker_.metrics(), broker_.metrics_live());
}

awaitable<Outcome> Service::run(GetXen&) {
  if (!config_.xen_view) {
    co_return failure(Error(make_error_code(errc::not_found),
                            "this broker does not run in Xen mode (qbrokerd --xen)"));
  }
  Outcome o;
  o.body = config_.xen_view();
  co_return o;
}

awaitable<Outcome> Service::run(GetPool&) {
  Outcome o;
  json::object body = broker_.pool().to_json();
  body["enabled"] = broker_.pool().enabled();
  o.body = std::move(body);
  co_return o;
}

awaitable<Outcome> Service::run(WatchEvents&) {
  co_return failure(
      Error(make_error_code(errc::internal), "the event stream is served by the server"));
}

}  // namespace broker::api
