// The API served for real: a Broker, the Service and the Server on an io_context that runs on a
// thread of its own, listening on a Unix socket in a temporary directory. Tests are the clients,
// from the test thread, through real sockets. Anything that touches the broker runs on the
// io_context thread through on_io().
#pragma once

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <future>
#include <thread>

#include "../broker/lifecycle_fixture.hpp"
#include "broker/api/server.hpp"
#include "broker/api/service.hpp"
#include "broker/control/broker.hpp"
#include "fdpass/devices.hpp"

namespace qbtest {

struct ApiFixture : LifecycleFixture {
  boost::asio::io_context io;
  broker::Broker broker;
  broker::api::Service service;
  broker::api::Server server;
  std::string socket;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work;
  std::thread thread;

  static broker::api::ServerLimits test_limits() {
    broker::api::ServerLimits l;
    l.request_timeout = std::chrono::milliseconds(500);
    l.idle_timeout = std::chrono::milliseconds(2000);
    l.write_timeout = std::chrono::milliseconds(1000);
    l.heartbeat = std::chrono::milliseconds(200);
    return l;
  }

  ApiFixture(uid_t base, broker::api::ServerLimits limits = test_limits(),
             broker::BrokerConfig config = {}, std::optional<gid_t> admin_gid = std::nullopt)
      : LifecycleFixture(base),
        broker(io.get_executor(), with_state(std::move(config), state.path()), launcher, roots),
        service(broker, {}),
        server(io.get_executor(), service, limits,
               broker::api::AccessPolicy{::geteuid(), admin_gid}),
        socket(run.path() + "/api.sock"),
        work(io.get_executor()) {
    ::chmod(run.path().c_str(), 0755);  // tests connect as other uids too
    auto l = fdpass::listen_unix(socket, 0666, 0, 0, 4096);
    if (!l) throw std::runtime_error("listen: " + l.error().message());
    if (auto ok = server.start(std::move(*l)); !ok) throw std::runtime_error(ok.error().describe());
    thread = std::thread([this] { io.run(); });
  }

  ~ApiFixture() {
    on_io([this] { server.stop(); });
    // Let sessions wind down, then stop.
    for (int i = 0; i < 100 && on_io([this] { return server.connections(); }) > 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    work.reset();
    io.stop();
    thread.join();
  }

  static broker::BrokerConfig with_state(broker::BrokerConfig c, const std::string& dir) {
    c.records_dir = dir + "/domains";
    return c;
  }

  // Runs `f` on the io_context thread and returns its result.
  template <class F>
  auto on_io(F f) -> decltype(f()) {
    std::packaged_task<decltype(f())()> task(std::move(f));
    auto fut = task.get_future();
    boost::asio::post(io, [&task] { task(); });
    return fut.get();
  }
};

}  // namespace qbtest
