// Create: reserve the name, plan the disks and CDs through the same flows as hotplug (opened and
// checked by the broker, handed to QEMU on its command line with their bootindex), spawn the
// jailed QEMU paused (-S), connect QMP, plug the NICs and VNC over QMP while the guest has not
// run, then cont. A failure before the spawn frees the name; one after it tears the whole domain
// down by uid. A create that matches a warm-pool shape (docs/pool.md) takes a QEMU already
// spawned instead, and plugs its disks and CDs over QMP too, followed by a system_reset.
#include <chrono>
#include <cstdio>
#include <memory>

#include <boost/asio/awaitable.hpp>

#include "broker/core/log.hpp"
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

// The CDs and disks of the request, planned through the hotplug flows with the domain in
// planning mode: QEMU gets them on its command line, so the firmware's boot order includes them
// from the first instruction and no device costs a QMP round trip.
awaitable<Result<void>> plan_block_devices(Context& ctx, Domain& d, CreateDomain& request) {
  d.cold_plan = std::make_unique<ColdPlan>();
  for (auto& cd : request.cdroms) {
    if (auto ok = co_await plug_cdrom(ctx, d, std::move(cd)); !ok) co_return ok.error();
  }
  for (auto& disk : request.disks) {
    if (auto ok = co_await add_disk(ctx, d, std::move(disk)); !ok) co_return ok.error();
  }
  co_return Result<void>{};
}

// The NICs and the VNC listener, over QMP while the guest has not run: a tap and a listener are
// handed over with getfd, which has no command-line form.
awaitable<Result<void>> plug_network(Context& ctx, Domain& d, CreateDomain& request) {
  for (auto& nic : request.nics) {
    if (auto ok = co_await add_nic(ctx, d, std::move(nic)); !ok) co_return ok.error();
  }
  if (request.vnc) {
    auto ok = co_await set_vnc(ctx, d, std::move(*request.vnc));
    if (!ok) co_return ok.error();
  }
  co_return Result<void>{};
}

// The CDs and disks of a create that took a pooled QEMU, plugged over QMP while the guest has
// not run. The firmware builds its boot list from the bootindexes at reset, so one follows.
awaitable<Result<void>> plug_block_devices(Context& ctx, Domain& d, CreateDomain& request) {
  for (auto& cd : request.cdroms) {
    if (auto ok = co_await plug_cdrom(ctx, d, std::move(cd)); !ok) co_return ok.error();
  }
  for (auto& disk : request.disks) {
    if (auto ok = co_await add_disk(ctx, d, std::move(disk)); !ok) co_return ok.error();
  }
  qmp::Command reset = qmp::cmd::system_reset();
  if (auto ok = co_await call(ctx, d, std::move(reset)); !ok) co_return ok.error();
  co_return Result<void>{};
}

// Everything after the spawn: QMP, the block devices of a pooled QEMU, network devices, cont.
awaitable<Result<void>> bring_up(Context& ctx, Domains& domains, std::shared_ptr<Domain> d,
                                 CreateDomain& request) {
  auto& trace = d->instance().trace;
  if (auto ok = co_await domains.attach(d); !ok) co_return ok.error();
  trace.mark("qmp greeting+capabilities");
  d->set_state(RunState::paused);
  if (d->instance().pooled) {
    if (auto ok = co_await plug_block_devices(ctx, *d, request); !ok) co_return ok.error();
    trace.mark("disks+cds+reset");
  }
  if (auto ok = co_await plug_network(ctx, *d, request); !ok) co_return ok.error();
  if (!request.nics.empty() || request.vnc) trace.mark("nics+vnc");
  if (!request.spec.paused) {
    qmp::Command cont = qmp::cmd::cont();
    if (auto ok = co_await call(ctx, *d, std::move(cont)); !ok) co_return ok.error();
    d->set_state(RunState::running);
    trace.mark("cont");
  }
  co_return Result<void>{};
}

}  // namespace

awaitable<Result<std::shared_ptr<Domain>>> create(Context& ctx, Domains& domains,
                                                  CreateDomain request) {
  const auto started = std::chrono::steady_clock::now();
  auto reserved = domains.reserve(request.spec);
  if (!reserved) co_return reserved.error();
  auto d = *reserved;
  const std::string name = d->name();
  auto job = d->begin_job("create");
  ctx.events.publish(name, "domain", "starting");
  // The pool's refill waits while a create runs, so it never competes with one.
  auto refill_held = domains.pool().hold_refill();
  auto pooled = co_await domains.launch_pooled(d);
  if (!pooled) co_return pooled.error();
  if (!*pooled) {
    if (auto ok = co_await plan_block_devices(ctx, *d, request); !ok) {
      domains.unreserve(d);
      co_return ok.error();
    }
  }
  const auto planned = std::chrono::steady_clock::now();
  if (!*pooled) {
    std::unique_ptr<ColdPlan> plan = std::move(d->cold_plan);
    if (auto ok = co_await domains.launch(d, plan.get()); !ok) co_return ok.error();
  }
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
  auto& trace = d->instance().trace;
  trace.mark("record");
  char plan_ms[32];
  std::snprintf(plan_ms, sizeof plan_ms, "%.1f ms",
                std::chrono::duration<double, std::milli>(planned - started).count());
  log::debug("domain " + name + " started: devices planned " + plan_ms + ", then " +
                 trace.describe(),
             {{"DOMAIN", name}});
  ctx.events.publish(name, "domain", "created",
                     {{"uid", d->instance().uid},
                      {"pid", d->instance().pid},
                      {"pooled", d->instance().pooled}});
  co_return d;
}

}  // namespace broker::flows
