// Create: reserve the name, spawn the jailed QEMU paused (-S), connect QMP, plug the requested
// devices through the same flows as hotplug while the guest has not run (boot devices with their
// bootindex, then a reset so the firmware sees them in its boot order), then cont. A failure at
// any step tears the whole domain down by uid.
#include <boost/asio/awaitable.hpp>

#include "broker/flows/common.hpp"
#include "broker/flows/flows.hpp"

namespace broker::flows {
namespace asio = boost::asio;
using asio::awaitable;
using namespace detail;

namespace {

awaitable<Result<void>> plug_cdrom(Context& ctx, Domain& d, CdromSpec cd) {
  std::string path = cd.path;
  std::string id = cd.id;
  if (auto ok = co_await add_cdrom_drive(ctx, d, std::move(cd)); !ok) co_return ok.error();
  if (path.empty()) co_return Result<void>{};
  InsertMedium medium{std::move(path), false};
  co_return co_await insert_medium(ctx, d, std::move(id), std::move(medium));
}

// The devices of the request, in the order CDs, disks, NICs, VNC.
awaitable<Result<void>> plug_devices(Context& ctx, Domain& d, CreateDomain& request) {
  for (auto& cd : request.cdroms) {
    if (auto ok = co_await plug_cdrom(ctx, d, std::move(cd)); !ok) co_return ok.error();
  }
  for (auto& disk : request.disks) {
    if (auto ok = co_await add_disk(ctx, d, std::move(disk)); !ok) co_return ok.error();
  }
  for (auto& nic : request.nics) {
    if (auto ok = co_await add_nic(ctx, d, std::move(nic)); !ok) co_return ok.error();
  }
  if (request.vnc) {
    auto ok = co_await set_vnc(ctx, d, std::move(*request.vnc));
    if (!ok) co_return ok.error();
  }
  co_return Result<void>{};
}

// Everything after the spawn: QMP, devices, cont.
awaitable<Result<void>> bring_up(Context& ctx, Domains& domains, std::shared_ptr<Domain> d,
                                 CreateDomain& request) {
  if (auto ok = co_await domains.attach(d); !ok) co_return ok.error();
  d->set_state(RunState::paused);
  if (auto ok = co_await plug_devices(ctx, *d, request); !ok) co_return ok.error();
  if (!request.spec.boot_order.empty()) {
    // The firmware reads its boot order from fw_cfg, which QEMU fills in at each reset; the one
    // at start-up ran before the boot devices were plugged. Nothing has run yet, so a reset here
    // only rewrites it.
    qmp::Command reset = qmp::cmd::system_reset();
    if (auto ok = co_await call(ctx, *d, std::move(reset)); !ok) co_return ok.error();
  }
  if (!request.spec.paused) {
    qmp::Command cont = qmp::cmd::cont();
    if (auto ok = co_await call(ctx, *d, std::move(cont)); !ok) co_return ok.error();
    d->set_state(RunState::running);
  }
  co_return Result<void>{};
}

}  // namespace

awaitable<Result<std::shared_ptr<Domain>>> create(Context& ctx, Domains& domains,
                                                  CreateDomain request) {
  auto reserved = domains.reserve(request.spec);
  if (!reserved) co_return reserved.error();
  auto d = *reserved;
  const std::string name = d->name();
  auto job = d->begin_job("create");
  ctx.events.publish(name, "domain", "starting");
  if (auto ok = co_await domains.launch(d); !ok) co_return ok.error();
  if (auto ok = co_await bring_up(ctx, domains, d, request); !ok) {
    co_await domains.teardown(d, false);
    ctx.events.publish(name, "domain", "failed", {{"error", ok.error().describe()}});
    co_return ok.error();
  }
  job->release();
  if (auto ok = co_await domains.records().persist(*d); !ok) {
    co_await domains.teardown(d, false);
    ctx.events.publish(name, "domain", "failed", {{"error", ok.error().describe()}});
    co_return ok.error();
  }
  ctx.events.publish(name, "domain", "created",
                     {{"uid", d->instance().uid}, {"pid", d->instance().pid}});
  co_return d;
}

}  // namespace broker::flows
