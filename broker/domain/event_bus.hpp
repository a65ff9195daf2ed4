// The broker's event stream: domain lifecycle, job progress and every QEMU event, for
// GET /v1/events. Each subscriber has a bounded queue; one that falls behind gets a final
// "dropped" event and is closed, so a slow consumer never makes the broker's memory grow.
// Single-threaded: publish and consume on the broker's io_context.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <optional>
#include <string>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/object.hpp>

namespace broker {

struct BusEvent {
  std::uint64_t seq = 0;
  std::string domain;  // empty for broker-wide events
  std::string kind;    // "domain", "job", "qemu", "dropped"
  std::string name;    // e.g. "created", "destroyed", "progress", or the QEMU event name
  boost::json::object data;
  std::int64_t timestamp_us = 0;  // wall clock, microseconds since the epoch

  boost::json::object to_json() const;
};

class EventBus;

class EventStream {
 public:
  ~EventStream();
  EventStream(const EventStream&) = delete;
  EventStream& operator=(const EventStream&) = delete;

  // The next event, or nullopt at the deadline. After overflow it yields one "dropped" event and
  // then reports closed().
  boost::asio::awaitable<std::optional<BusEvent>> next(std::chrono::steady_clock::time_point deadline);
  bool closed() const { return closed_ && queue_.empty(); }
  std::size_t queued() const { return queue_.size(); }

 private:
  friend class EventBus;
  EventStream(EventBus& bus, boost::asio::any_io_executor ex, std::string domain, std::size_t cap);
  void push(const BusEvent& e);

  EventBus* bus_;
  std::string domain_;
  std::size_t capacity_;
  std::deque<BusEvent> queue_;
  boost::asio::steady_timer wake_;
  bool closed_ = false;
  std::list<EventStream*>::iterator self_;
};

class EventBus {
 public:
  explicit EventBus(boost::asio::any_io_executor ex) : ex_(std::move(ex)) {}
  ~EventBus();

  void publish(std::string domain, std::string kind, std::string name,
               boost::json::object data = {});
  // Events from now on; `domain` empty: all domains.
  std::unique_ptr<EventStream> subscribe(std::string domain = {}, std::size_t capacity = 256);
  std::size_t subscribers() const { return streams_.size(); }

 private:
  friend class EventStream;
  boost::asio::any_io_executor ex_;
  std::list<EventStream*> streams_;
  std::uint64_t seq_ = 0;
};

}  // namespace broker
