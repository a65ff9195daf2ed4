#include "broker/domain/session.hpp"

#include "broker/domain/qmp_call.hpp"
#include "fdpass/devices.hpp"

namespace broker {

boost::asio::awaitable<Result<void>> connect_qmp(boost::asio::any_io_executor ex, Domain& d,
                                                 const SessionConfig& config) {
  auto sock = fdpass::connect_unix(d.instance().qmp_path);
  if (!sock) co_return make_error(sock.error(), "connecting to QMP at " + d.instance().qmp_path);
  qmp::ClientOptions opts;
  opts.limits.max_line = config.qmp_max_line;
  if (config.transcript) {
    opts.transcript = [hook = config.transcript](qmp::Direction dir, std::string_view line,
                                                  bool fd) { hook(dir, line, fd); };
  }
  auto client = co_await qmp::Client::connect(ex, std::move(*sock),
                                              qmp::after(config.start_timeout), std::move(opts));
  if (!client) co_return from_qmp(client.error(), "QMP handshake");
  d.set_qmp(std::move(*client));
  co_return Result<void>{};
}

boost::asio::awaitable<void> pump_events(std::shared_ptr<Domain> d, EventBus& bus,
                                         std::function<void()> on_resume) {
  qmp::Client* client = d->qmp();
  if (client == nullptr) co_return;
  auto sub = client->subscribe({.capacity = 256});
  for (;;) {
    auto ev = co_await sub.next(qmp::after(std::chrono::hours(24)));
    if (!ev) {
      if (ev.error().code == qmp::errc::timeout) continue;
      co_return;  // disconnected: QEMU is gone (or the domain is being destroyed)
    }
    if (ev->name == qmp::event::kStop) d->set_state(RunState::paused);
    if (ev->name == qmp::event::kResume) d->set_state(RunState::running);
    if (ev->name == qmp::event::kShutdown) d->set_state(RunState::shutdown);
    bus.publish(d->name(), "qemu", ev->name, ev->data);
    if (ev->name == qmp::event::kResume && on_resume) on_resume();
  }
}

}  // namespace broker
